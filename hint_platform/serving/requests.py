"""A request's text as its model reads it: the format the model was trained on
(`export.data_format`), tokenised and checked. `CachedPredictor` reads every request through it,
and `hint predict`'s driver checks a job's instructions with it before any model work (it needs
the export's config and tokenizer, not its weights).

SNI's formats (and an export that does not say): a T5 model's instruction and input end in EOS;
P3's: the instruction (the masked template) goes to the hypernetwork and the input (the prompt)
to the model, neither ending in EOS (t0_tasks.py), and a model without a hypernetwork reads the
prompt alone (T0's concat: the prompt carries the instruction). A decoder-only model reads the
causal layout: BOS first, no EOS (the prompt goes on).
"""

from __future__ import annotations

from pathlib import Path

from hint_model import HintConfig
from hint_platform import export
from hint_platform.errors import UserError
from pipelines import Tokenizer, formats, load_tokenizer

TaskKey = tuple[int, ...]  # the instruction's token ids (empty for variants that read none)


class BadRequest(UserError):
    """An instruction or input the model cannot take; the message says which and why."""

    status = 400  # what `hint serve` answers it with


def check_text(text: str, where: str) -> str:
    """`text` if it is well-formed Unicode: JSON's "\\ud800" escapes decode to lone surrogates,
    which neither the tokenizer nor UTF-8 takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise BadRequest(f"{where} is not well-formed Unicode: a lone surrogate at character {e.start}") from None
    return text


class RequestReader:
    """(instruction, input) texts -> the token ids the model reads, as its training data gave them."""

    def __init__(self, config: HintConfig, tokenizer: Tokenizer, trained_on: export.DataFormat,
                 max_input_len: int = 1024):
        self.config, self.tokenizer, self.max_input_len = config, tokenizer, max_input_len
        self.p3 = trained_on.family == "p3"
        self.input_eos = trained_on.input_eos and not config.is_decoder_only

    @classmethod
    def of_export(cls, export_dir: str | Path, max_input_len: int = 1024) -> RequestReader:
        """The reader of an export's model, without loading its weights."""
        return cls(export.model_config(export_dir), load_tokenizer(export.tokenizer_dir(export_dir)),
                   export.data_format(export_dir), max_input_len)

    def texts(self, instruction: str, input_text: str) -> tuple[str, str]:
        """(instruction text, model text) in the format the model's variant trains on: P3's
        (`joint`, or T0's `concat`), else SNI's. A decoder-only SNI concat model reads
        Tk-Instruct's instruction part as its prompt's prefix, whose key/values are the task's
        state (pipelines.dataset, the causal layout)."""
        cfg = self.config
        if self.p3:
            return formats.p3_joint(instruction, input_text) if cfg.hypernetwork else formats.p3_concat(input_text)
        if cfg.hypernetwork:  # 'Def', or a 'Def + k Pos' text as training read it
            return formats.sni_served(instruction, input_text)
        if cfg.variant == "no_instruct":
            return formats.no_instruct(input_text)
        if cfg.is_decoder_only:
            return (formats.sni_concat_instruction(instruction, [], 0, lambda text: True),
                    formats.sni_concat_prompt(input_text))
        return formats.sni_concat(instruction, [], 0, input_text)

    def task_key(self, instruction: str) -> TaskKey:
        """The instruction's tokens (none for a variant that reads no instruction apart), checked:
        not empty, at most max_hyper_len tokens."""
        if not isinstance(instruction, str) or not instruction.strip():
            raise BadRequest("instruction is empty")
        check_text(instruction, "instruction")
        text = self.texts(instruction, "")[0]
        if not text:
            return ()
        tokens = self.tokenizer.encode(text, eos=self.input_eos)
        if self.config.is_decoder_only:  # the causal layout: BOS first
            tokens = list(self.tokenizer.bos_ids) + tokens
        limit = self.config.max_hyper_len
        if len(tokens) > limit:
            raise BadRequest(f"instruction has {len(tokens)} tokens, more than the model's "
                             f"max_hyper_len={limit}")
        return tuple(tokens)

    def input_ids(self, instruction: str, input_text: str) -> list[int]:
        if not isinstance(input_text, str):
            raise BadRequest(f"input must be a string, got {type(input_text).__name__}")
        check_text(input_text, "input")
        hyper, text = self.texts(instruction, input_text)
        if not self.config.is_decoder_only:
            return self.tokenizer.encode(text, self.max_input_len, eos=self.input_eos)
        bos = [] if hyper else list(self.tokenizer.bos_ids)  # the prompt's start (causal layout)
        return bos + self.tokenizer.encode(text, self.max_input_len - len(bos), eos=False)

    def tokenize(self, instruction: str, inputs: list[str]) -> tuple[TaskKey, list[list[int]]]:
        """A request's task key and input ids (one call: replicas run it off the event loop)."""
        return self.task_key(instruction), [self.input_ids(instruction, text) for text in inputs]
