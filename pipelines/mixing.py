"""One pass of the mixed stream (pipelines/dataset.py's docstring says how sources are drawn),
resumable from a position in it.

`MixedStream.position()` is where the next example of the pass comes from, as JSON: its
`example_index`, the mixer's random state, every sized task's next arrival time and planned
records left (the slots it has given are the rest), every unsized source's place (its task, and
in it the slots taken, or the reader's own position: C4's next document, packing buffer and
splitter state) and the bad records skipped so far. `MixedStream(..., start=position)` builds
the pass as a fresh one does (reading the SNI task files and P3 records, as every pass does to
know the tasks' sizes), opens each task at its place and yields exactly the examples an
uninterrupted pass yields from there on, without reading, formatting or tokenising what came
before. Two cases still go over their earlier slots (rendering, not tokenising, or reading a
test file's lines again): few-shot P3 templates and the test part of p3_rendered (p3.py).
"""

from __future__ import annotations

import heapq
import random
from collections import Counter
from collections.abc import Iterator

from pipelines import c4, p3, sni
from pipelines.bad_records import BadRecords
from pipelines.budget import TokenBudget
from pipelines.example import Example, TaskStream, load_rng, save_rng
from pipelines.spec import SourceSpec

_END = object()


def pass_seed(seed: int, epoch: int, source: int) -> int:
    """The seed source number `source` reads pass `epoch` with."""
    return random.Random(f"{seed}:{epoch}:{source}").getrandbits(32)


def _task_streams(spec: SourceSpec, budget: TokenBudget, bad: BadRecords, seed: int) -> list[TaskStream]:
    if spec.kind == "sni":
        return [stream for _, stream in sni.task_streams(spec, budget, bad, seed)]
    if spec.kind == "c4":
        return [TaskStream(lambda at: c4.C4Examples(spec, budget.tokenizer, bad, seed, at or None,
                                                    budget.causal))]
    return [stream for _, stream in p3.task_streams(spec, budget, bad, seed)]


class _SizedTasks:
    """Draws among tasks with probability proportional to weight x planned records left, exactly
    and in O(log tasks) a draw: each task's records get exponential arrival times of rate
    `weight` (their order statistics drawn one at a time, Renyi's representation), and the
    earliest arrival overall is the next row. `draw` gives an Example, None (a slot without an
    example), or raises IndexError once every task is exhausted. `start`: a `position()`."""

    def __init__(self, tasks: list[tuple[float, TaskStream]], rng: random.Random,
                 start: list | None = None):
        self.rng = rng
        if start is None:
            start = [(rng.expovariate(weight * stream.size), order, stream.size)
                     for order, (weight, stream) in enumerate(tasks) if stream.size]
        self.heap = []
        for time, order, left in start:
            weight, stream = tasks[order]
            self.heap.append((time, order, left, weight, stream.slots_from(stream.size - left)))
        heapq.heapify(self.heap)  # a saved heap is one already: unchanged

    def draw(self) -> Example | None:
        time, order, left, weight, slots = self.heap[0]
        slot = next(slots, _END)
        left -= 1
        if slot is _END or not left:
            heapq.heappop(self.heap)
        else:
            heapq.heapreplace(self.heap, (time + self.rng.expovariate(weight * left), order, left, weight, slots))
        return None if slot is _END else slot

    def position(self) -> list:
        return [[time, order, left] for time, order, left, _, _ in self.heap]


class _UnsizedSource:
    """A source whose size is not known before reading (C4, a test part): its tasks' slots in
    turn, from `start`, a `position()`: [task number, place in it], the place being the
    reader's own position where it keeps one (C4's), else the slots taken."""

    def __init__(self, streams: list[TaskStream], start: list | tuple = (0, 0)):
        self.streams = streams
        self.task, at = start
        self._open(at)

    def _open(self, at) -> None:
        self.taken = at if isinstance(at, int) else 0
        self.slots = self.streams[self.task].slots_from(at) if self.task < len(self.streams) else iter(())

    def __iter__(self) -> Iterator[Example | None]:
        return self

    def __next__(self) -> Example | None:
        while self.task < len(self.streams):
            slot = next(self.slots, _END)
            if slot is not _END:
                self.taken += 1
                return slot
            self.task += 1
            self._open(0)
        raise StopIteration

    def position(self) -> list:
        at = self.slots.position() if hasattr(self.slots, "position") else self.taken
        return [self.task, at]


class MixedStream:
    """The examples of pass `epoch`, from `start` (a `position()` of the same specs, seed and
    pass) or from the pass's beginning; `index` is the next example's example_index."""

    def __init__(self, specs: list[SourceSpec], budget: TokenBudget, bad: BadRecords, seed: int,
                 epoch: int = 0, start: dict | None = None):
        self.epoch, self.bad = epoch, bad
        self.rng = random.Random(f"{seed}:{epoch}")
        places = dict(start["unsized"]) if start else {}
        sized, self.sized_weight, self.unsized = [], 0.0, []
        for i, spec in enumerate(specs):
            streams = _task_streams(spec, budget, bad, pass_seed(seed, epoch, i))
            if spec.is_train and spec.kind != "c4":
                sized += [(spec.weight, s) for s in streams]
                self.sized_weight += spec.weight if streams else 0.0
            elif streams and (start is None or str(i) in places):  # an exhausted one stays out
                self.unsized.append((spec.weight, i, _UnsizedSource(streams, places.get(str(i), (0, 0)))))
        self.tasks = _SizedTasks(sized, self.rng, start and start["sized"])
        self.index = 0
        if start:
            load_rng(self.rng, start["rng"])
            self.index = start["index"]
            # Building the pass read the task files again: the count is the saved one.
            bad.by_source = Counter(start["bad"])

    def __iter__(self) -> Iterator[Example]:
        return self

    def __next__(self) -> Example:
        while self.tasks.heap or self.unsized:
            weights = [w for w, _, _ in self.unsized] + ([self.sized_weight] if self.tasks.heap else [])
            i = self.rng.choices(range(len(weights)), weights=weights)[0]
            if i == len(self.unsized):
                slot = self.tasks.draw()
            else:
                slot = next(self.unsized[i][2], _END)
                if slot is _END:
                    del self.unsized[i]
                    continue
            if slot is not None:
                self.index += 1
                return slot
        raise StopIteration

    def position(self) -> dict:
        """Where the next example comes from, as JSON (module docstring)."""
        return {"epoch": self.epoch, "index": self.index, "rng": save_rng(self.rng),
                "sized": self.tasks.position(),
                "unsized": {str(i): source.position() for _, i, source in self.unsized},
                "bad": dict(self.bad.by_source)}
