"""The cached predictor every serving path shares (`hint predict` actors, `hint serve`
replicas, the MLflow pyfunc): a model loaded from an export directory or the registry, and an
LRU cache of task states (TaskModules) bounded in MiB, keyed by the instruction's tokens.

A task's state is generated once, on its first input; every later input of the task, in any
batch, reuses it. A batch may mix tasks: their states are stacked and each example picks its
own row (the model's batched path), so concurrent requests of different tasks share a forward.
On the CPU a batch of inputs of very different lengths runs as several forwards of similar
lengths (`split_by_length`): every row is padded to its forward's longest.

A request's texts become token ids as the model's training data gave them: serving/requests.py.
"""

from __future__ import annotations

import json
import threading
import time
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from hint_model import TaskModules
from hint_platform import export
from hint_platform.errors import UserError
from hint_platform.placement import default_cache_bytes, task_state_bytes
from hint_platform.evaluation.inference import task_modules
from hint_platform.serving.requests import BadRequest, RequestReader, TaskKey
from pipelines.collate import pad_sequences

# What one more forward costs on the CPU, in padded input tokens: a forward decodes every step
# through the decoder and the vocabulary projection (read from memory whatever the rows), while
# an input token costs its encoding. Measured with `bench/serve_load.py`'s small model on one
# core: ~150 ms a forward + ~1 ms an input token. On an accelerator padding is nearly free
# until it is saturated: batches run whole there.
CPU_FORWARD_COST_TOKENS = 150


def split_by_length(lengths: list[int], forward_cost: float, max_rows: int) -> list[list[int]]:
    """Indices of rows grouped into forwards of at most `max_rows`, shortest rows first, at the
    least cost: a forward costs `forward_cost` plus its rows times its longest row (each row is
    padded to it). Exact: a least-cost grouping of rows sorted by length is contiguous."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    best, start = [0.0] + [float("inf")] * len(order), [0] * (len(order) + 1)
    for end in range(1, len(order) + 1):  # best[end]: the least cost of the `end` shortest rows
        for first in range(max(0, end - max_rows), end):
            cost = best[first] + forward_cost + (end - first) * lengths[order[end - 1]]
            if cost < best[end]:
                best[end], start[end] = cost, first
    groups, end = [], len(order)
    while end:
        groups.append(order[start[end]:end])
        end = start[end]
    return groups[::-1]


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0  # states kept between requests
    in_flight_bytes: int = 0  # states requests hold that are not kept (too large, no room, cache off)
    stacked_bytes: int = 0  # the stacked copy of the mixed batch being run
    peak_bytes: int = 0  # the most of the three together so far
    capacity_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    @property
    def total_bytes(self) -> int:
        return self.bytes + self.in_flight_bytes + self.stacked_bytes


class TaskStateCache:
    """Every task state in memory, counted against `capacity_bytes`: the states kept between
    requests (least recently used first out), the states requests hold while they run, and the
    stacked copy of a mixed batch. Kept states are evicted to make room for the other two; a
    state a request holds is never evicted (that frees nothing), so what requests hold is
    bounded by the requests in flight, not by the capacity. A state is kept only when it fits
    beside everything counted (capacity 0: nothing is kept)."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self._entries: OrderedDict[TaskKey, TaskModules] = OrderedDict()
        self._holders: dict[int, int] = {}  # id(state) -> requests holding it
        self._kept: set[int] = set()  # id() of the states in _entries
        self._lock = threading.Lock()  # replicas generate on worker threads
        self.stats = CacheStats(capacity_bytes=capacity_bytes)

    def get(self, key: TaskKey, count_miss: bool = True) -> TaskModules | None:
        """The kept state of `key`, held for the caller (`release` it), or None."""
        with self._lock:
            state = self._entries.get(key)
            if state is None:
                self.stats.misses += count_miss
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            self._hold(state)
            return state

    def put(self, key: TaskKey, state: TaskModules) -> int:
        """Count a newly generated `state`, held for the caller (`release` it), and keep it if
        it fits; returns how many older states were evicted to make room."""
        size = state.nbytes
        with self._lock:
            self._hold(state)
            evicted = self._make_room(size)
            if key in self._entries or self.stats.total_bytes + size > self.stats.capacity_bytes:
                self.stats.in_flight_bytes += size
            else:
                self._entries[key] = state
                self._kept.add(id(state))
                self.stats.bytes += size
                self.stats.entries = len(self._entries)
            self._note_peak()
            return evicted

    def release(self, state: TaskModules) -> None:
        """A request is done with `state` (from get or put)."""
        with self._lock:
            holders = self._holders.pop(id(state)) - 1
            if holders:
                self._holders[id(state)] = holders
            elif id(state) not in self._kept:
                self.stats.in_flight_bytes -= state.nbytes
            self._make_room(0)

    @contextmanager
    def stacked(self, nbytes: int):
        """Count a batch's stacked copy of its tasks' states while it lives."""
        with self._lock:
            self.stats.stacked_bytes += nbytes
            self._make_room(0)
            self._note_peak()
        try:
            yield
        finally:
            with self._lock:
                self.stats.stacked_bytes -= nbytes

    def __contains__(self, key: TaskKey) -> bool:
        return key in self._entries

    def _hold(self, state: TaskModules) -> None:
        self._holders[id(state)] = self._holders.get(id(state), 0) + 1

    def _make_room(self, size: int) -> int:
        """Evict kept states no request holds, least recently used first, until `size` more
        bytes fit; returns how many were evicted."""
        evicted = 0
        for key in list(self._entries):
            if self.stats.total_bytes + size <= self.stats.capacity_bytes:
                break
            state = self._entries[key]
            if id(state) in self._holders:
                continue
            del self._entries[key]
            self._kept.discard(id(state))
            self.stats.bytes -= state.nbytes
            evicted += 1
        self.stats.evictions += evicted
        self.stats.entries = len(self._entries)
        return evicted

    def _note_peak(self) -> None:
        self.stats.peak_bytes = max(self.stats.peak_bytes, self.stats.total_bytes)


@dataclass(frozen=True)
class Generation:
    """How outputs are generated: a request may ask for less than the predictor's bounds."""

    max_new_tokens: int
    num_beams: int


class CachedPredictor:
    """(instruction, input) -> output text, generating each task's state once.

    `max_new_tokens` (default: the model's target length) and `num_beams` (> 1: beam search)
    are the defaults and the bounds of what a request may ask for (`generation`). `cache_mib`
    defaults to `placement.default_cache_bytes` (sized from the model and the device).
    """

    def __init__(self, export_dir: str | Path, *, cache_mib: float | None = None, max_new_tokens: int | None = None,
                 num_beams: int = 1, batch_size: int = 16, max_input_len: int = 1024,
                 device: torch.device | str | None = None, dtype: str | None = None):
        for name, value in (("max_new_tokens", max_new_tokens), ("num_beams", num_beams),
                            ("batch_size", batch_size), ("max_input_len", max_input_len)):
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")
        # On the GPU Ray assigned to this process (bf16 there), else the CPU: placement.py.
        self.model, self.tokenizer = export.load(export_dir, device=device, dtype=dtype)
        # Requests read as the model's training data was (serving/requests.py).
        self.reader = RequestReader(self.model.config, self.tokenizer, export.data_format(export_dir), max_input_len)
        self.device = next(self.model.parameters()).device
        capacity = default_cache_bytes(self.model) if cache_mib is None else int(cache_mib * 2**20)
        self.cache = TaskStateCache(capacity)
        self.longest_state_bytes = task_state_bytes(self.model)  # at max_hyper_len tokens
        self.default = Generation(max_new_tokens or self.model.config.max_target_len, num_beams)
        self.batch_size = batch_size
        self.forward_cost = CPU_FORWARD_COST_TOKENS if self.device.type == "cpu" else None
        self.batches = self.mixed_batches = self.rows = 0  # forwards run, how many mixed tasks, their rows
        # Seconds the model ran: generating task states, and generating outputs (what a cache
        # saves is the first; a replica's model thread is busy for both together).
        self.state_seconds = self.generate_seconds = 0.0

    def generation(self, max_new_tokens=None, num_beams=None) -> Generation:
        """A request's generation arguments (None: the default), each an integer from 1 to the
        predictor's own value."""
        asked = {"max_new_tokens": max_new_tokens, "num_beams": num_beams}
        for name, value in asked.items():
            bound = getattr(self.default, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= bound):
                raise BadRequest(f"field {name!r} must be an integer from 1 to {bound} (this server's bound), "
                                 f"got {json.dumps(value)[:40]}")
        return Generation(max_new_tokens or self.default.max_new_tokens, num_beams or self.default.num_beams)

    # ---- task states ----

    def task_state(self, key: TaskKey) -> tuple[TaskModules, bool]:
        """(the task's state, whether it came from the cache), held for the caller until
        `self.cache.release(state)`."""
        state = self.cache.get(key)
        if state is not None:
            return state, True
        start = time.perf_counter()
        state = task_modules(self.model, key)
        self.state_seconds += time.perf_counter() - start
        self.cache.put(key, state)
        return state, False

    # ---- generation ----

    @torch.no_grad()
    def generate(self, items: list[tuple[TaskModules, list[int], Generation]]) -> list[str]:
        """Outputs for (task state, input ids, generation) items, in order: items of one
        generation `batch_size` at a time, each batch as one forward or, on the CPU, several of
        similar input lengths (`split_by_length`); a forward may mix tasks (states stacked, each
        example with its own row)."""
        start = time.perf_counter()
        by_generation: dict[Generation, list[int]] = {}
        for i, (_, _, generation) in enumerate(items):
            by_generation.setdefault(generation, []).append(i)
        outputs = [""] * len(items)
        for generation, indices in by_generation.items():
            for first in range(0, len(indices), self.batch_size):
                for forward in self._forwards(indices[first:first + self.batch_size], items):
                    texts = self._generate_batch([items[i][:2] for i in forward], generation)
                    for i, text in zip(forward, texts):
                        outputs[i] = text
        self.generate_seconds += time.perf_counter() - start
        return outputs

    def _forwards(self, batch: list[int], items: list) -> list[list[int]]:
        if self.forward_cost is None:
            return [batch]
        groups = split_by_length([len(items[i][1]) for i in batch], self.forward_cost, self.batch_size)
        return [[batch[j] for j in group] for group in groups]

    def _generate_batch(self, items: list[tuple[TaskModules, list[int]]], generation: Generation) -> list[str]:
        rows: dict[int, int] = {}  # id(state) -> its row in the stacked modules
        unique: list[TaskModules] = []
        for state, _ in items:
            if id(state) not in rows:
                rows[id(state)] = len(unique)
                unique.append(state)
        input_ids, mask = pad_sequences([ids for _, ids in items], self.tokenizer.pad_id)
        input_ids, mask = input_ids.to(self.device), mask.to(self.device)
        self.batches += 1
        self.rows += len(items)
        if len(unique) == 1:
            tokens = self.model.generate(input_ids, mask, modules=unique[0], **asdict(generation))
        else:
            self.mixed_batches += 1
            modules = TaskModules.stack(unique)
            with self.cache.stacked(modules.nbytes):
                tokens = self.model.generate(input_ids, mask, modules=modules,
                                             task_index=torch.tensor([rows[id(s)] for s, _ in items],
                                                                     device=self.device),
                                             **asdict(generation))
            del modules
        return [self.tokenizer.decode(row).strip() for row in tokens.cpu().tolist()]

    def predict_tokens(self, keys: list[TaskKey], input_ids: list[list[int]]) -> list[str]:
        """Outputs for tokenised rows; rows are ordered by task so most batches hold one."""
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        states: dict[TaskKey, TaskModules] = {}
        try:
            for i in order:
                if keys[i] not in states:
                    states[keys[i]] = self.task_state(keys[i])[0]
            outs = self.generate([(states[keys[i]], input_ids[i], self.default) for i in order])
        finally:
            for state in states.values():
                self.cache.release(state)
        result = [""] * len(keys)
        for i, out in zip(order, outs):
            result[i] = out
        return result

    def predict(self, instructions: list[str], inputs: list[str]) -> list[str]:
        if len(instructions) != len(inputs):
            raise BadRequest(f"{len(instructions)} instructions for {len(inputs)} inputs")
        keys = [self.reader.task_key(text) for text in instructions]
        return self.predict_tokens(keys, [self.reader.input_ids(t, x) for t, x in zip(instructions, inputs)])
