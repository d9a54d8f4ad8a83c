"""One example on its way to the trainer, before tokenisation, and a task's stream of them."""

from __future__ import annotations

from collections.abc import Callable, Iterator
import random
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
    """One task's examples for a pass. `slots_from(k)` yields the slots from the `k`-th on (0:
    all of them), at most `size` in all, one per record the pass planned: an Example, or None
    where the record gives none (a template that does not apply to it, a bad record skipped),
    so that the mixer draws a task in proportion to its planned records (pipelines/dataset.py).
    A resumed pass starts a task at the slot it had reached, without formatting or tokenising
    the slots before (pipelines/mixing.py). `size` is None where it is not known before reading
    (c4, the test part). Iterating the stream gives its examples."""

    slots_from: Callable[[int], Iterator[Example | None]]
    size: int | None = None

    def __iter__(self) -> Iterator[Example]:
        return (ex for ex in self.slots_from(0) if ex is not None)


def save_rng(rng: random.Random) -> list:
    """A random.Random's state as JSON (a reader's or the mixer's position)."""
    version, internal, gauss = rng.getstate()
    return [version, list(internal), gauss]


def load_rng(rng: random.Random, saved: list) -> None:
    version, internal, gauss = saved
    rng.setstate((version, tuple(internal), gauss))
