"""The input formats: what the hypernetwork reads and what the underlying model reads.

The `sni_def`, `sni_concat`, `no_instruct` and `p3_*` functions return `(hyper_text,
input_text)`; the target is the instance's output, unchanged. An empty hyper_text means the
variant has no instruction for the hypernetwork. The readers use the pieces (`*_hyper`,
`sni_concat_parts`) with a `fits` test, to leave out what does not fit the lengths.

SNI, as the reference builds it (allenai/hyper-task-descriptions, ni_tasks/):
- HINT 'Def' (ni_registry.py `convert_format`): the hypernetwork reads `Definition[0].strip()`,
  nothing added; the model the instance input.
- HINT 'Def + k Pos' (ni_registry.py `convert_format_pack_positive_examples`, the
  `natural_instruction_positive_example_hyper_2` task): `Definition: ` + the raw definition, with each positive example that fits
  the hypernetwork's length PREPENDED, so example 2 comes before example 1; one that does not
  fit is left out (the others are still tried).
- Tk-Instruct, the concatenation baseline (ni_collator.py): `Definition: ...\n\n`, the positive
  examples (each ending in a blank line) as long as the whole input still fits, then `Now
  complete the following example -\nInput: ...\nOutput:`; the first example that does not fit
  ends the list.
A definition, example input or example output that does not end in punctuation gets a "."
(except the raw definition HINT reads). Model inputs are stripped: T5's SentencePiece drops
outer whitespace anyway, and the reference strips the Tk-Instruct string.

P3 (T0): 'joint' gives the hypernetwork the template with the instance fields masked and the
model the full prompt; 'split' gives the model only the instance fields as `field: value`
lines, in the order the template first uses them (the paper does not fix this rendering);
'concat' is T0 itself: the full prompt, no hypernetwork input. Few-shot (few_shot.py, with the
arguments of seqio_tasks/my_t0_tasks.py): `<prompt> Output: <target>\n\n` per shot, then
` Definition: ` and the instruction (HINT) or the prompt (T0).
"""

from __future__ import annotations

import string
from collections.abc import Callable

Fits = Callable[[str], bool]


def _period(text: str) -> str:
    return text if text and text[-1] in string.punctuation else text + "."


def _fits_anything(text: str) -> bool:
    return True


def positive_example(number: int, example: dict) -> str:
    """One positive example as both ni_collator.py and ni_registry.py write it."""
    return (_period(f" Positive Example {number} -\nInput: {example['input'].strip()}") + "\n"
            + _period(f" Output: {example['output'].strip()}") + "\n")


def sni_def_hyper(definition: str) -> str:
    """HINT 'Def': the hypernetwork's text, the definition alone."""
    return definition.strip()


def sni_def(definition: str, input_text: str) -> tuple[str, str]:
    """HINT 'Def': the hypernetwork reads the definition, the model the raw input."""
    return sni_def_hyper(definition), input_text.strip()


def sni_served(instruction: str, input_text: str) -> tuple[str, str]:
    """A served request as HINT reads it: the model reads the input as 'Def' does; the
    hypernetwork reads a 'Def + k Pos' text as sni_def_pos_hyper wrote it (its examples first,
    each block beginning " Positive Example") as it is, its leading space included (a byte-level
    BPE tokenizer reads " Positive" as another token than "Positive"), anything else as the
    definition of 'Def'."""
    if instruction.startswith(" Positive Example "):
        return instruction, input_text.strip()
    return sni_def(instruction, input_text)


def sni_def_pos_hyper(definition: str, positives: list[dict], k: int, fits_hyper: Fits) -> str:
    """HINT 'Def + k Pos': the hypernetwork's text (see the module docstring)."""
    text = "Definition: " + definition
    for number, example in enumerate(positives[:k], start=1):
        block = positive_example(number, example)
        if fits_hyper(text + block):
            text = block + text
    return text


def sni_concat_parts(definition: str, positives: list[dict], k: int, input_text: str,
                     fits_input: Fits = _fits_anything) -> tuple[str, str, str]:
    """Tk-Instruct's input in three parts: (definition + examples, the instance, the output cue).
    Examples are kept while the whole input fits, as ni_collator.py decides it."""
    definition_block = _definition_block(definition)
    instance = "Now complete the following example -\n" + _period(f"Input: {input_text.strip()}")
    cue = "\nOutput: "
    # The collator measures the kept examples joined by " " (and then joins them with "").
    kept = _kept_examples(positives, k, lambda blocks: fits_input(
        definition_block + " ".join(blocks[:-1]) + blocks[-1] + instance + cue))
    return definition_block + "".join(kept), instance, cue


def sni_concat_instruction(definition: str, positives: list[dict], k: int, fits_hyper: Fits) -> str:
    """Tk-Instruct's instruction part (definition + examples) for a decoder-only model, which
    reads it as a prefix whose key/values are computed once per task: so the examples kept are
    those that fit the instruction's own length, whatever the instance (ni_collator.py lets each
    instance decide, which would make the prefix differ from input to input)."""
    definition_block = _definition_block(definition)
    kept = _kept_examples(positives, k, lambda blocks: fits_hyper(definition_block + "".join(blocks)))
    return definition_block + "".join(kept)


def sni_concat_prompt(input_text: str) -> str:
    """Tk-Instruct's instance and output cue, which follow the instruction part in a
    decoder-only model's prompt (the target, tokenised apart, follows the cue)."""
    _, instance, cue = sni_concat_parts("", [], 0, input_text)
    return instance + cue.rstrip()


def _definition_block(definition: str) -> str:
    return _period("Definition: " + definition.strip()) + "\n\n"


def _kept_examples(positives: list[dict], k: int, fits: Callable[[list[str]], bool]) -> list[str]:
    """Tk-Instruct's positive example blocks, up to k, until the first that `fits` refuses
    (it gets the blocks kept so far plus the next one)."""
    kept: list[str] = []
    for number, example in enumerate(positives[:k], start=1):
        block = positive_example(number, example) + "\n"
        if not fits(kept + [block]):
            break
        kept.append(block)
    return kept


def sni_concat(definition: str, positives: list[dict], k: int, input_text: str,
               fits_input: Fits = _fits_anything) -> tuple[str, str]:
    """Tk-Instruct (the full-concatenation baseline) with 0..k positive examples."""
    return "", "".join(sni_concat_parts(definition, positives, k, input_text, fits_input)).strip()


def no_instruct(input_text: str) -> tuple[str, str]:
    """No-Instruct: the raw input only."""
    return "", input_text.strip()


def p3_joint(masked_template: str, prompt: str) -> tuple[str, str]:
    return masked_template, prompt.strip()


def p3_split(masked_template: str, fields: list[tuple[str, str]]) -> tuple[str, str]:
    return masked_template, "\n".join(f"{name}: {value}" for name, value in fields)


def p3_concat(prompt: str) -> tuple[str, str]:
    return "", prompt.strip()


def p3_few_shot(shots: list[tuple[str, str]], hyper: str, text: str, fmt: str) -> tuple[str, str]:
    """(prompt, target) shots before the instruction: the hypernetwork's for HINT ('joint',
    'split'), the model's for T0 ('concat'), joined as few_shot.py joins them (the ` Definition: `
    separator stays when every shot was pruned)."""
    block = "".join(f"{prompt} Output: {target}\n\n" for prompt, target in shots) + " Definition: "
    if fmt == "concat":
        return hyper, (block + text).strip()
    return block + hyper, text
