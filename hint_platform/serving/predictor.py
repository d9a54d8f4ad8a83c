"""The cached predictor every serving path shares (`hint predict` actors, `hint serve`
replicas, the MLflow pyfunc): a model loaded from an export directory or the registry, and an
LRU cache of task states (TaskModules) bounded in MiB, keyed by the instruction's tokens.

A task's state is generated once, on its first input; every later input of the task, in any
batch, reuses it. A batch may mix tasks: their states are stacked and each example picks its
own row (the model's batched path), so concurrent requests of different tasks share a forward.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from hint_model import TaskModules
from hint_platform import export
from hint_platform.errors import UserError
from hint_platform.placement import default_cache_bytes
from hint_platform.evaluation.inference import task_modules
from pipelines import formats
from pipelines.collate import pad_sequences

TaskKey = tuple[int, ...]  # the instruction's token ids (empty for variants that read none)


class BadRequest(UserError):
    """An instruction or input the model cannot take; the message says which and why."""


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0
    entries: int = 0
    bytes: int = 0
    capacity_bytes: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class TaskStateCache:
    """Least-recently-used task states, at most `capacity_bytes` of tensors in all. A state
    larger than the whole capacity is used but not kept (capacity 0: no cache)."""

    def __init__(self, capacity_bytes: int):
        if capacity_bytes < 0:
            raise ValueError(f"cache capacity must be >= 0 bytes, got {capacity_bytes}")
        self._entries: OrderedDict[TaskKey, TaskModules] = OrderedDict()
        self._lock = threading.Lock()  # replicas generate on worker threads
        self.stats = CacheStats(capacity_bytes=capacity_bytes)

    def get(self, key: TaskKey) -> TaskModules | None:
        with self._lock:
            state = self._entries.get(key)
            if state is None:
                self.stats.misses += 1
                return None
            self._entries.move_to_end(key)
            self.stats.hits += 1
            return state

    def put(self, key: TaskKey, state: TaskModules) -> int:
        """Keep `state`; returns how many older states were evicted to make room."""
        size = state.nbytes
        with self._lock:
            if key in self._entries or size > self.stats.capacity_bytes:
                return 0
            evicted = 0
            while self.stats.bytes + size > self.stats.capacity_bytes:
                _, old = self._entries.popitem(last=False)
                self.stats.bytes -= old.nbytes
                evicted += 1
            self._entries[key] = state
            self.stats.bytes += size
            self.stats.evictions += evicted
            self.stats.entries = len(self._entries)
            return evicted

    def __contains__(self, key: TaskKey) -> bool:
        return key in self._entries


class CachedPredictor:
    """(instruction, input) -> output text, generating each task's state once.

    `max_new_tokens` defaults to the model's target length; `num_beams` > 1 is beam search.
    `cache_mib` defaults to `placement.default_cache_bytes` (sized from the model and the device).
    """

    def __init__(self, export_dir: str | Path, *, cache_mib: float | None = None, max_new_tokens: int | None = None,
                 num_beams: int = 1, batch_size: int = 16, max_input_len: int = 1024,
                 device: torch.device | str | None = None, dtype: str | None = None):
        # On the GPU Ray assigned to this process (bf16 there), else the CPU: placement.py.
        self.model, self.tokenizer = export.load(export_dir, device=device, dtype=dtype)
        self.device = next(self.model.parameters()).device
        capacity = default_cache_bytes(self.model) if cache_mib is None else int(cache_mib * 2**20)
        self.cache = TaskStateCache(capacity)
        self.max_new_tokens = max_new_tokens or self.model.config.max_target_len
        self.num_beams, self.batch_size, self.max_input_len = num_beams, batch_size, max_input_len
        self.batches = self.mixed_batches = 0  # forwards run, and how many mixed several tasks

    # ---- text -> tokens ----

    def texts(self, instruction: str, input_text: str) -> tuple[str, str]:
        """(instruction text, model text) in the SNI format the model's variant trains on. A
        decoder-only concat model reads Tk-Instruct's instruction part as its prompt's prefix,
        whose key/values are the task's state (pipelines.dataset, the causal layout)."""
        cfg = self.model.config
        if cfg.hypernetwork:
            return formats.sni_def(instruction, input_text)
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
        text = self.texts(instruction, "")[0]
        if not text:
            return ()
        tokens = self.tokenizer.encode(text)
        if self.model.config.is_decoder_only:  # the causal layout: BOS first, no EOS
            tokens = list(self.tokenizer.bos_ids) + tokens[:-1]
        limit = self.model.config.max_hyper_len
        if len(tokens) > limit:
            raise BadRequest(f"instruction has {len(tokens)} tokens, more than the model's "
                             f"max_hyper_len={limit}")
        return tuple(tokens)

    def input_ids(self, instruction: str, input_text: str) -> list[int]:
        if not isinstance(input_text, str):
            raise BadRequest(f"input must be a string, got {type(input_text).__name__}")
        hyper, text = self.texts(instruction, input_text)
        if not self.model.config.is_decoder_only:
            return self.tokenizer.encode(text, self.max_input_len)
        bos = [] if hyper else list(self.tokenizer.bos_ids)  # the prompt's start (causal layout)
        return bos + self.tokenizer.encode(text, self.max_input_len - len(bos), eos=False)

    # ---- task states ----

    def task_state(self, key: TaskKey) -> tuple[TaskModules, bool]:
        """(the task's state, whether it came from the cache)."""
        state = self.cache.get(key)
        if state is not None:
            return state, True
        state = task_modules(self.model, key)
        self.cache.put(key, state)
        return state, False

    # ---- generation ----

    @torch.no_grad()
    def generate(self, items: list[tuple[TaskModules, list[int]]]) -> list[str]:
        """Outputs for (task state, input ids) items, `batch_size` at a time; a batch may mix
        tasks (states stacked, each example with its own row)."""
        outputs: list[str] = []
        for start in range(0, len(items), self.batch_size):
            chunk = items[start:start + self.batch_size]
            rows: dict[int, int] = {}  # id(state) -> its row in the stacked modules
            unique: list[TaskModules] = []
            for state, _ in chunk:
                if id(state) not in rows:
                    rows[id(state)] = len(unique)
                    unique.append(state)
            index = torch.tensor([rows[id(s)] for s, _ in chunk], device=self.device)
            input_ids, mask = pad_sequences([ids for _, ids in chunk], self.tokenizer.pad_id)
            input_ids, mask = input_ids.to(self.device), mask.to(self.device)
            modules = unique[0] if len(unique) == 1 else TaskModules.stack(unique)
            self.batches += 1
            self.mixed_batches += len(unique) > 1
            tokens = self.model.generate(input_ids, mask, modules=modules,
                                         task_index=None if len(unique) == 1 else index,
                                         max_new_tokens=self.max_new_tokens, num_beams=self.num_beams)
            outputs += [self.tokenizer.decode(row).strip() for row in tokens.cpu().tolist()]
        return outputs

    def predict_tokens(self, keys: list[TaskKey], input_ids: list[list[int]]) -> list[str]:
        """Outputs for tokenised rows; rows are ordered by task so most batches hold one."""
        order = sorted(range(len(keys)), key=lambda i: keys[i])
        states: dict[TaskKey, TaskModules] = {}
        for i in order:
            if keys[i] not in states:
                states[keys[i]] = self.task_state(keys[i])[0]
        outs = self.generate([(states[keys[i]], input_ids[i]) for i in order])
        result = [""] * len(keys)
        for i, out in zip(order, outs):
            result[i] = out
        return result

    def predict(self, instructions: list[str], inputs: list[str]) -> list[str]:
        if len(instructions) != len(inputs):
            raise BadRequest(f"{len(instructions)} instructions for {len(inputs)} inputs")
        keys = [self.task_key(text) for text in instructions]
        return self.predict_tokens(keys, [self.input_ids(t, x) for t, x in zip(instructions, inputs)])
