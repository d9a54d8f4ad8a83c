"""The input formats: what the hypernetwork reads and what the underlying model reads.

Every function returns `(hyper_text, input_text)`; the target is the instance's output,
unchanged. An empty hyper_text means the variant has no instruction for the hypernetwork.

SNI strings follow Tk-Instruct's collator exactly (allenai/natural-instructions, ni_collator.py):
a definition, example input or example output that does not end in punctuation gets a ".";
positive examples are numbered from 1 and each begins with a space. Tk-Instruct drops
examples that do not fit the length budget; we keep them and truncate on tokens instead.

HINT's hypernetwork gets the instruction part of that string (definition, then k positive
examples); the underlying model gets the raw instance input.

P3 (T0): 'joint' gives the hypernetwork the template with the instance fields masked and the
model the full prompt; 'split' gives the model only the instance fields as `field: value`
lines, in the order the template first uses them (the paper does not fix this rendering);
'concat' is T0 itself: the full prompt, no hypernetwork input.
"""

from __future__ import annotations

import string


def _period(text: str) -> str:
    return text if text and text[-1] in string.punctuation else text + "."


def definition_block(definition: str) -> str:
    return "Definition: " + _period(definition.strip()) + "\n\n"


def positive_examples_block(examples: list[dict], k: int) -> str:
    blocks = []
    for i, ex in enumerate(examples[:k], start=1):
        blocks.append(f" Positive Example {i} -\n" + _period(f"Input: {ex['input'].strip()}") + "\n"
                      + _period(f" Output: {ex['output'].strip()}") + "\n")
    return "".join(blocks)


def task_input_block(text: str) -> str:
    return "Now complete the following example -\n" + _period(f"Input: {text.strip()}") + "\nOutput: "


def sni_def(definition: str, input_text: str) -> tuple[str, str]:
    """HINT 'Def': the hypernetwork reads the definition, the model the raw input."""
    return definition_block(definition).rstrip(), input_text.strip()


def sni_def_pos(definition: str, positives: list[dict], k: int, input_text: str) -> tuple[str, str]:
    """HINT 'Def + k Pos': the hypernetwork reads the definition and k positive examples."""
    return (definition_block(definition) + positive_examples_block(positives, k)).rstrip(), input_text.strip()


def sni_concat(definition: str, positives: list[dict], k: int, input_text: str) -> tuple[str, str]:
    """Tk-Instruct (the full-concatenation baseline) with 0..k positive examples."""
    return "", definition_block(definition) + positive_examples_block(positives, k) + task_input_block(input_text)


def no_instruct(input_text: str) -> tuple[str, str]:
    """No-Instruct: the raw input only."""
    return "", input_text.strip()


def p3_joint(masked_template: str, prompt: str) -> tuple[str, str]:
    return masked_template, prompt.strip()


def p3_split(masked_template: str, fields: list[tuple[str, str]]) -> tuple[str, str]:
    return masked_template, "\n".join(f"{name}: {value}" for name, value in fields)


def p3_concat(prompt: str) -> tuple[str, str]:
    return "", prompt.strip()
