"""The token limits of a pipeline, and a counter, for the readers that drop what does not fit.

The reference drops whole examples that would not fit before anything is truncated: Tk-Instruct's
positive examples (ni_collator.py), the positive examples HINT's hypernetwork reads
(ni_registry.py), P3's few-shot exemplars (few_shot.py). Those decisions need token counts where
the text is formatted, so the readers get the limits the tokenisation stage later cuts to.
Counts include the EOS, as `tokenizer(text)["input_ids"]` does in the reference. In the causal
layout of a decoder-only model (`causal`), the instruction and the input end without an EOS and
the first of them starts with the tokenizer's BOS (if it has one): counted instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipelines.tokenizer import Tokenizer


@dataclass(frozen=True)
class TokenBudget:
    tokenizer: Tokenizer
    max_input_len: int = 1024
    max_hyper_len: int = 1024
    max_target_len: int = 256
    causal: bool = False

    def count(self, text: str, eos: bool = True) -> int:
        return len(self.tokenizer.encode(text, eos=eos))

    def prompt_count(self, text: str) -> int:
        """Tokens of an instruction or input as tokenize_block makes it."""
        if self.causal:
            return self.count(text, eos=False) + len(self.tokenizer.bos_ids)
        return self.count(text)

    def fits_input(self, text: str) -> bool:
        return self.prompt_count(text) <= self.max_input_len

    def fits_hyper(self, text: str) -> bool:
        return self.prompt_count(text) <= self.max_hyper_len
