"""Batching a replica's rows for its model thread: a batch is cut when the model is free.

Ray Serve's `@serve.batch` cuts a batch `batch_wait_timeout_s` after its first row whether or
not the previous batch is still running (Ray 2.60: `_process_batches` makes the next batch
before it waits for its semaphore). Under load the model is always busy, so every batch holds
only the row or two that came in during the wait and then queues for the model: with four
clients of `bench/serve_load.py`, every forward ran one row and each request waited for the
forwards of the other three. Here the rows wait in one queue and the model thread, once free,
takes all of them (up to `max_batch_size`) into its next forward. Only a model that was idle
waits `wait_s` for more rows to come with the first.
"""

from __future__ import annotations

import asyncio
from collections import deque
from concurrent.futures import Executor
from typing import Any, Callable


class Batcher:
    """`await batcher(row)` -> `run(rows)`'s answer for that row; `run` (rows -> one answer per
    row, in order) runs on `executor`, one batch at a time. A row whose request was cancelled
    while it waited is dropped; an exception in `run` (or a wrong number of answers) is every
    row of its batch's answer; cancelling the batcher's task cancels every row it holds."""

    def __init__(self, run: Callable[[list], list], executor: Executor, max_batch_size: int, wait_s: float):
        if max_batch_size < 1 or wait_s < 0:
            raise ValueError(f"Batcher needs max_batch_size >= 1 and wait_s >= 0, got {max_batch_size}, {wait_s}")
        self.run, self.executor = run, executor
        self.max_batch_size, self.wait_s = max_batch_size, wait_s
        self._waiting: deque[tuple[Any, asyncio.Future]] = deque()
        self._worker: asyncio.Task | None = None

    async def __call__(self, row: Any) -> Any:
        future = asyncio.get_running_loop().create_future()
        self._waiting.append((row, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())
        return await future

    async def _work(self) -> None:
        """Run batches until no row waits; started by a row that found the model idle."""
        loop = asyncio.get_running_loop()
        if self.wait_s and len(self._waiting) < self.max_batch_size:
            await asyncio.sleep(self.wait_s)
        while self._waiting:
            batch = []
            while self._waiting and len(batch) < self.max_batch_size:
                row, future = self._waiting.popleft()
                if not future.done():
                    batch.append((row, future))
            if not batch:
                continue
            try:
                answers = await loop.run_in_executor(self.executor, self.run, [row for row, _ in batch])
                if len(answers) != len(batch):
                    raise RuntimeError(f"the model answered {len(answers)} rows of a batch of {len(batch)}")
            except asyncio.CancelledError:  # the replica's loop is closing: no row may wait on
                for _, future in [*batch, *self._waiting]:
                    future.cancel()
                self._waiting.clear()
                raise
            except Exception as e:
                for _, future in batch:
                    if not future.done():
                        future.set_exception(e)
                continue
            for (_, future), answer in zip(batch, answers):
                if not future.done():
                    future.set_result(answer)
