"""The pass board: what the training workers and their data stream tell each other, and the
filter that leaves a resumed pass's consumed rows out (training/driver.py explains resume).

Imports no torch: Ray Data's processes of the stream (its read task, the DatasetManager and
SplitCoordinator actors) load this module to run the board's callables, and a new process that
imports torch spends seconds on it before the first step can have its data.
"""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import ray


@ray.remote(num_cpus=0)
class PassBoard:
    """The pass the training workers read next: rank 0 writes it before each pass, and the
    dataset's read task (started once every rank has asked for the pass) reads it. The read
    task also records the stream's position at the start of each block of the pass it reads
    (BoardRecord), and a checkpoint takes the last one at or before its first unconsumed
    example (`position_at`). Rank 0 lets go of the positions before the ranks' slowest row at
    every log step (`position_at` again), so the board holds those of a few log intervals."""

    def __init__(self):
        self.epoch = 0
        self.positions: list[dict] = []  # of the pass being read, in stream order

    def set(self, epoch: int) -> None:
        self.epoch = epoch

    def get(self) -> int:
        return self.epoch

    def record(self, position: dict) -> None:
        # A stream read again (a restarted worker group) records its positions again.
        self.positions = [p for p in self.positions
                          if p["epoch"] == position["epoch"] and p["index"] < position["index"]]
        self.positions.append(position)

    def position_at(self, epoch: int, index: int) -> dict | None:
        """The last position of pass `epoch` at or before example `index` (None: none held);
        the earlier ones are let go."""
        held = [i for i, p in enumerate(self.positions) if p["epoch"] == epoch and p["index"] <= index]
        if not held:
            return None
        self.positions = self.positions[held[-1]:]
        return self.positions[0]


class BoardEpoch:
    """The pipelines' `epoch` callable (build_dataset): the pass on the board."""

    def __init__(self, board):
        self.board = board

    def __call__(self) -> int:
        return ray.get(self.board.get.remote())


class BoardRecord:
    """The pipelines' `on_block` callable (build_dataset): the position goes to the board
    before its block is given (so it is there when a checkpoint asks for it)."""

    def __init__(self, board):
        self.board = board

    def __call__(self, position: dict) -> None:
        ray.get(self.board.record.remote(position))


def drop_consumed(block: pa.Table, consumed: np.ndarray, epoch: int) -> pa.Table:
    """A Ray Data `map_batches` function: the rows of `block` not marked in `consumed`, the
    bitmap of pass `epoch` (rows of other passes all stay)."""
    index = block["example_index"].to_numpy()
    seen = np.zeros(len(index), dtype=bool)
    known = (index < len(consumed)) & (block["epoch"].to_numpy() == epoch)
    seen[known] = consumed[index[known]]
    return block.filter(pa.array(~seen))
