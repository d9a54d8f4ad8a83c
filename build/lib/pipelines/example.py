"""One example on its way to the trainer, before tokenisation."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Example:
    task: str
    hyper: str | list[int]  # text, or token ids for corpora tokenised where they are packed (C4)
    input: str | list[int]
    target: str | list[int]
    references: list[str] = field(default_factory=list)  # every accepted output (evaluation)
    answer_choices: list[str] = field(default_factory=list)  # rank classification
    answer_index: int = -1  # index of the right choice, -1 when there are no choices
