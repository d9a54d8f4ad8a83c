"""Where training is, and how a worker finds its next batch from there.

`TrainState` is the position: optimizer steps done, the epoch (the pass over the data), and a
bitmap over the rows' deterministic `example_index` of the examples consumed in that pass (the
union over ranks once a checkpoint gathers it). The board (training/board.py) tells the data
stream which pass the workers are about to read (each pass has its own shuffle,
pipelines/dataset.py). The rest of this module turns a dataset shard, read pass after pass, into steps that skip what the state
says was consumed (training/driver.py explains resume).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import ray
import torch
import torch.distributed as dist
from ray.data.collate_fn import NumpyBatchCollateFn

from hint_platform.errors import TrainingError
from pipelines.collate import step_micro_batches

ROW_KEYS = ("hyper_input_ids", "input_ids", "labels", "epoch", "example_index", "bad_records_skipped")


@dataclass
class TrainState:
    """Where training is: optimizer steps done, the epoch, and the examples consumed in it."""

    step: int = 0
    epoch: int = 0
    consumed: torch.Tensor = None  # bool [max example_index + 1] of the current epoch
    # Where the stream of the epoch is to be read from again (pipelines/mixing.py): a place at
    # or before the first example not consumed; None: the epoch's start.
    position: dict | None = None

    def __post_init__(self):
        if self.consumed is None:
            self.consumed = torch.zeros(0, dtype=torch.bool)

    def mark(self, example_indices: list[int]) -> None:
        top = max(example_indices, default=-1) + 1
        if top > len(self.consumed):
            grown = torch.zeros(max(top, 2 * len(self.consumed)), dtype=torch.bool)
            grown[: len(self.consumed)] = self.consumed
            self.consumed = grown
        self.consumed[torch.tensor(example_indices, dtype=torch.long)] = True

    def is_consumed(self, example_index: int) -> bool:
        return example_index < len(self.consumed) and bool(self.consumed[example_index])

    def num_consumed(self) -> int:
        return int(self.consumed.sum())

    def first_unconsumed(self) -> int:
        """The lowest example_index of the epoch not consumed: every one before it was."""
        free = (~self.consumed).nonzero()
        return int(free[0]) if len(free) else len(self.consumed)

    def gather(self) -> None:
        """Makes `consumed` the union over all ranks (each rank marks only what it trained)."""
        if not dist.is_initialized():
            return
        size = torch.tensor([len(self.consumed)])
        dist.all_reduce(size, op=dist.ReduceOp.MAX)
        bitmap = torch.zeros(int(size), dtype=torch.uint8)
        bitmap[: len(self.consumed)] = self.consumed.to(torch.uint8)
        dist.all_reduce(bitmap, op=dist.ReduceOp.MAX)
        self.consumed = bitmap.bool()


def checkpoint_position(board, state: TrainState) -> dict | None:
    """Where a checkpoint of `state` (gathered over ranks) resumes its pass's stream from."""
    return ray.get(board.position_at.remote(state.epoch, state.first_unconsumed()))


def passes(shard, board, state: TrainState, rank: int) -> Iterator:
    """The shard once per pass, the board set to the pass first (`state.epoch`, which
    global_batches moves on after each)."""
    while True:
        if rank == 0:
            ray.get(board.set.remote(state.epoch))
        yield shard


class RowsOf(NumpyBatchCollateFn):
    """collate_fn for `iter_torch_batches`: a numpy batch -> the rows the loop still needs
    (those not consumed before a resume), as plain int lists. Padding happens per micro-batch
    in the loop, once the rows of a full micro-batch are known."""

    def __init__(self, consumed: TrainState):
        self.consumed = consumed

    def __call__(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        rows = []
        for i in range(len(batch["example_index"])):
            if (int(batch["epoch"][i]) != self.consumed.epoch
                    or not self.consumed.is_consumed(int(batch["example_index"][i]))):
                rows.append({k: np.asarray(batch[k][i]).tolist() for k in ROW_KEYS})
        return rows


def global_batches(epochs: Iterator, state: TrainState, micro: int, accum: int
                   ) -> Iterator[tuple[list[list[dict]], float]]:
    """Yields (this worker's `accum` micro-batches of `micro` rows, seconds waited for them),
    step after step, over the dataset shards of `epochs` in turn; `state.epoch` and
    `state.consumed` follow the epochs."""
    empty_epochs = 0
    for shard in epochs:
        batches = shard.iter_torch_batches(batch_size=micro, collate_fn=RowsOf(state),
                                           prefetch_batches=2)
        rows = (row for batch in batches for row in batch)
        stepped = False
        while True:
            start = time.perf_counter()
            taken = [row for _, row in zip(range(micro * accum), rows)]
            waited = time.perf_counter() - start
            if not all_ranks(len(taken) == micro * accum):
                break
            stepped = True
            yield step_micro_batches(taken, micro), waited
        empty_epochs = 0 if stepped else empty_epochs + 1
        if empty_epochs == 2:  # a whole fresh epoch without one step: too little data
            raise TrainingError(
                f"the training data has fewer examples than one step needs "
                f"(train.global_batch_size); each of the workers needs {micro * accum}")
        state.epoch += 1
        state.consumed = torch.zeros(0, dtype=torch.bool)


def all_ranks(flag: bool) -> bool:
    """True when `flag` holds on every rank."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def max_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())
