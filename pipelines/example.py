"""One example on its way to the trainer, before tokenisation, and a task's stream of them."""

from __future__ import annotations

from collections.abc import Iterator
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
    input_eos: bool = True  # EOS after the input and hypernetwork text (not on P3's: t0_tasks.py)


@dataclass
class TaskStream:
    """One task's examples for a pass. `slots` yields at most `size` items, one per record the
    pass planned: an Example, or None where the record gives none (a template that does not
    apply to it, a bad record skipped), so that the mixer draws a task in proportion to its
    planned records (pipelines/dataset.py). `size` is None where it is not known before
    reading (c4, the test part). Iterating the stream gives its examples."""

    slots: Iterator[Example | None]
    size: int | None = None

    def __iter__(self) -> Iterator[Example]:
        return (ex for ex in self.slots if ex is not None)
