"""The deterministic mixed stream of examples, as plain Python rows or a Ray Dataset.

Stages: read -> parse -> format (one sequential stream: it is what fixes the order) ->
tokenise (Ray Data `map_batches`, in parallel) -> rows:

    hyper_input_ids, input_ids, labels   int lists, truncated on tokens; EOS-terminated except
                                         P3's inputs and hypernetwork inputs (see tokenize_block)
                                         and the causal layout's (see below)
    task                                 task name
    epoch, example_index                 the pass, and the position in that pass's stream (0-based)
    references                           all accepted outputs (SNI; [] otherwise)
    answer_choices, answer_index         rank classification (P3; [] and -1 otherwise)
    bad_records_skipped                  records skipped (on_bad_record="skip") so far in the pass,
                                         counted at the end of the row's block of BLOCK_ROWS rows

Mixing, T0's (t0_tasks.py `mixture_cap`, all_t0_tasks.py's rates; seqio's examples-proportional
mixing) and SNI's (ni_registry.py: one dataset of every task's instances, shuffled): in a pass,
each task of a `part: train` source of SNI or P3 plans its records (shuffled, capped: the
readers), and the next row comes from a task drawn with probability proportional to its source's
`weight` times its planned records left. With equal weights every planned record is equally
likely to come next, so every task's share of any stretch of the stream follows its (capped)
size, from the first rows to the last, and all tasks end together. (The reference draws with
replacement at fixed rates from endlessly repeated tasks; drawing without replacement within a
pass gives each task the same expected share and no task runs dry early.) Sources whose size is
not known before reading them, C4 (packed segments) and every `part: test` source, are drawn
with probability proportional to their weight against the sized sources' weights together; a
test source goes task by task in file order (a task's rows are contiguous, so evaluation
generates each task's modules once). An exhausted task or source drops out; the pass ends when
all are exhausted.

Passes: the stream of pass (epoch) e uses its own seed, so every pass reshuffles the records,
draws a new capped sample and a new interleaving (the reference reshuffles each repetition).
Same specs, seed and epoch, same rows in the same order (what lets training resume by a bitmap
of consumed example_index values, hint_platform/training/state.py).

The causal layout (`causal=True`, for a decoder-only model: the platform chooses it from the
model, never the user): the instruction and the input end WITHOUT an EOS (the prompt goes on),
the first non-empty of them starts with the tokenizer's BOS (OPT's, Llama's; GPT-2 has none),
the target ends with the EOS. SNI `concat` then puts Tk-Instruct's instruction part
(definition + examples) in `hyper_input_ids` and the instance with its `Output:` cue in
`input_ids`, so that the model can compute the instruction's key/values once per task
(pipelines.sni). `collate(rows, causal=True)` makes the batches.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipelines import c4, p3, sni
from pipelines.bad_records import BadRecords
from pipelines.budget import TokenBudget
from pipelines.example import Example, TaskStream
from pipelines.spec import SourceSpec
from pipelines.tokenizer import Tokenizer, cut, load_tokenizer, tokenizer_from_proto

log = logging.getLogger(__name__)
BLOCK_ROWS = 256

_ids = pa.list_(pa.int32())
_strs = pa.list_(pa.string())
_common = [("task", pa.string()), ("epoch", pa.int32()), ("example_index", pa.int64()), ("references", _strs),
           ("answer_choices", _strs), ("answer_index", pa.int32()), ("bad_records_skipped", pa.int64())]
# Before tokenisation a part is text, or token ids when the reader tokenised it (C4).
TEXT_SCHEMA = pa.schema([("hyper", pa.string()), ("input", pa.string()), ("target", pa.string()),
                         ("hyper_tokens", _ids), ("input_tokens", _ids), ("target_tokens", _ids),
                         ("input_eos", pa.bool_()), *_common])
ROW_SCHEMA = pa.schema([("hyper_input_ids", _ids), ("input_ids", _ids), ("labels", _ids), *_common])


def as_specs(specs: Sequence[SourceSpec | dict]) -> list[SourceSpec]:
    if not specs:
        raise ValueError("data: no sources given")
    return [s if isinstance(s, SourceSpec) else SourceSpec.from_dict(s, where=f"data source {i}")
            for i, s in enumerate(specs)]


def _task_streams(spec: SourceSpec, budget: TokenBudget, bad: BadRecords, seed: int) -> list[TaskStream]:
    if spec.kind == "sni":
        return [stream for _, stream in sni.task_streams(spec, budget, bad, seed)]
    if spec.kind == "c4":
        return [TaskStream(c4.examples(spec, budget.tokenizer, bad, seed, budget.causal))]
    return [stream for _, stream in p3.task_streams(spec, budget, bad, seed)]


def pass_seed(seed: int, epoch: int, source: int) -> int:
    """The seed source number `source` reads pass `epoch` with."""
    return random.Random(f"{seed}:{epoch}:{source}").getrandbits(32)


class _SizedTasks:
    """Draws among tasks with probability proportional to weight x planned records left, exactly
    and in O(log tasks) a draw: each task's records get exponential arrival times of rate
    `weight` (their order statistics drawn one at a time, Renyi's representation), and the
    earliest arrival overall is the next row. `draw` gives an Example, None (a slot without an
    example), or raises IndexError once every task is exhausted."""

    def __init__(self, tasks: list[tuple[float, TaskStream]], rng: random.Random):
        self.rng = rng
        self.heap = []
        for order, (weight, stream) in enumerate(tasks):
            if stream.size:
                self.heap.append((rng.expovariate(weight * stream.size), order, stream.size, weight, stream))
        heapq.heapify(self.heap)

    def draw(self) -> Example | None:
        time, order, left, weight, stream = self.heap[0]
        slot = next(stream.slots, _END)
        left -= 1
        if slot is _END or not left:
            heapq.heappop(self.heap)
        else:
            heapq.heapreplace(self.heap, (time + self.rng.expovariate(weight * left), order, left, weight, stream))
        return None if slot is _END else slot


_END = object()


def mixed_examples(specs: list[SourceSpec], budget: TokenBudget, bad: BadRecords, seed: int,
                   epoch: int = 0) -> Iterator[Example]:
    """One pass of the mixed stream (see the module docstring)."""
    rng = random.Random(f"{seed}:{epoch}")
    sized, sized_weight, unsized = [], 0.0, []
    for i, spec in enumerate(specs):
        streams = _task_streams(spec, budget, bad, pass_seed(seed, epoch, i))
        if spec.is_train and spec.kind != "c4":
            sized += [(spec.weight, s) for s in streams]
            sized_weight += spec.weight if streams else 0.0
        elif streams:
            unsized.append((spec.weight, itertools.chain.from_iterable(s.slots for s in streams)))
    tasks = _SizedTasks(sized, rng)
    while tasks.heap or unsized:
        weights = [w for w, _ in unsized] + ([sized_weight] if tasks.heap else [])
        i = rng.choices(range(len(weights)), weights=weights)[0]
        if i == len(unsized):
            slot = tasks.draw()
        else:
            slot = next(unsized[i][1], _END)
            if slot is _END:
                del unsized[i]
                continue
        if slot is not None:
            yield slot


def text_blocks(specs: list[SourceSpec], budget: TokenBudget, *, on_bad_record: str, seed: int,
                bad: BadRecords | None = None, epoch: int = 0, num_epochs: int = 1) -> Iterator[pa.Table]:
    """The mixed stream of passes epoch, epoch + 1, ... (`num_epochs` of them) as Arrow tables of
    TEXT_SCHEMA, at most BLOCK_ROWS rows each (a block never spans two passes). `budget` holds
    the lengths tokenize_block will cut to: the readers drop what would not fit first. Bad
    records are counted per pass unless `bad` is given."""
    for e in range(epoch, epoch + num_epochs):
        yield from _pass_blocks(specs, budget, bad or BadRecords(on_bad_record), seed, e)


def _pass_blocks(specs: list[SourceSpec], budget: TokenBudget, bad: BadRecords, seed: int,
                 epoch: int) -> Iterator[pa.Table]:
    stream = enumerate(mixed_examples(specs, budget, bad, seed, epoch))
    while True:
        chunk = list(itertools.islice(stream, BLOCK_ROWS))
        if not chunk:
            if bad.skipped:
                log.warning("data: %d bad record(s) skipped: %s", bad.skipped,
                            ", ".join(f"{source} ({n})" for source, n in bad.by_source.items()))
            return
        columns: dict[str, list[Any]] = {name: [] for name in TEXT_SCHEMA.names}
        for index, ex in chunk:
            for part in ("hyper", "input", "target"):
                value = getattr(ex, part)
                columns[part].append(value if isinstance(value, str) else None)
                columns[f"{part}_tokens"].append(None if isinstance(value, str) else value)
            columns["task"].append(ex.task)
            columns["input_eos"].append(ex.input_eos)
            columns["example_index"].append(index)
            columns["references"].append(ex.references)
            columns["answer_choices"].append(ex.answer_choices)
            columns["answer_index"].append(ex.answer_index)
        columns["epoch"] = [epoch] * len(chunk)
        # Counted once the chunk is read: the running total at the chunk's end.
        columns["bad_records_skipped"] = [bad.skipped] * len(chunk)
        yield pa.table(columns, schema=TEXT_SCHEMA)


def _fit(ids: list[int], max_len: int, eos_id: int | None) -> list[int]:
    """Ids a reader gave, cut to max_len (EOS-terminated again when they were)."""
    return ids if len(ids) <= max_len else cut(ids, max_len, eos_id)


def with_bos(tok: Tokenizer, hyper_ids: list[int], input_ids: list[int]) -> tuple[list[int], list[int]]:
    """The causal layout's instruction and input ids with the tokenizer's BOS (if any) before
    the sequence's start: the instruction, else the input (counted in the lengths they were cut
    to by the caller)."""
    bos = list(tok.bos_ids)
    return (bos + hyper_ids, input_ids) if hyper_ids else (hyper_ids, bos + input_ids)


def tokenize_block(block: pa.Table, proto: bytes, max_input_len: int, max_hyper_len: int,
                   max_target_len: int, causal: bool = False) -> pa.Table:
    """Text block -> row block. An empty instruction becomes no tokens at all (no EOS). Texts end
    in EOS, except the inputs and hypernetwork inputs of rows whose `input_eos` is false (P3:
    t0_tasks.py's features have add_eos=False on both) and, in the causal layout, every
    instruction and input (the prompt goes on)."""
    tok = tokenizer_from_proto(proto)
    input_eos = block.column("input_eos").to_pylist()
    out = {}
    for part, name, max_len in (("hyper", "hyper_input_ids", max_hyper_len),
                                ("input", "input_ids", max_input_len),
                                ("target", "labels", max_target_len)):
        eos = part == "target" or not causal
        bos = tok.bos_ids if causal and part != "target" else ()
        texts, tokens = block.column(part).to_pylist(), block.column(f"{part}_tokens").to_pylist()
        encoded = {}
        for eos in (True, False):
            todo = [i for i, t in enumerate(texts)
                    if t and (part == "target" or (not causal and input_eos[i])) == eos]
            encoded.update(zip(todo, tok.encode_batch([texts[i] for i in todo], max_len - len(bos), eos)))
        eos = part == "target" or not causal  # ids a reader gave (C4) and empty parts
        empty = [tok.eos_id] if part != "hyper" and eos else []
        end = tok.eos_id if eos else None
        out[name] = [encoded[i] if i in encoded else _fit(tokens[i], max_len - len(bos), end)
                     if tokens[i] is not None else empty for i in range(len(texts))]
    if causal:
        for i in range(len(out["hyper_input_ids"])):
            out["hyper_input_ids"][i], out["input_ids"][i] = with_bos(
                tok, out["hyper_input_ids"][i], out["input_ids"][i])
    for name, _ in _common:
        out[name] = block.column(name)
    return pa.table(out, schema=ROW_SCHEMA)


def iter_records(specs: Sequence[SourceSpec | dict], tokenizer_dir: str, *, max_input_len: int = 1024,
                 max_hyper_len: int = 1024, max_target_len: int = 256, on_bad_record: str = "error",
                 seed: int = 0, bad: BadRecords | None = None, causal: bool = False,
                 epoch: int = 0, num_epochs: int = 1) -> Iterator[dict]:
    """The rows of build_dataset, in the same order, in this process (no Ray). Pass `bad` to
    read the skip counts (per file / task) when the iterator is done."""
    tok = load_tokenizer(tokenizer_dir)
    budget = TokenBudget(tok, max_input_len, max_hyper_len, max_target_len, causal)
    for block in text_blocks(as_specs(specs), budget, on_bad_record=on_bad_record, seed=seed, bad=bad,
                             epoch=epoch, num_epochs=num_epochs):
        yield from tokenize_block(block, tok.proto, max_input_len, max_hyper_len, max_target_len,
                                  causal).to_pylist()


def build_dataset(specs: Sequence[SourceSpec | dict], tokenizer_dir: str, *, max_input_len: int = 1024,
                  max_hyper_len: int = 1024, max_target_len: int = 256, on_bad_record: str = "error",
                  seed: int = 0, causal: bool = False, epoch: int | Callable[[], int] = 0):
    """A ray.data.Dataset of the rows of pass `epoch` (see the module docstring), in
    deterministic order. `epoch` may be a callable (picklable) that the read task calls at each
    execution of the dataset: a dataset read again for every pass (the trainer's) learns its
    pass there.

    One read task produces the mixed text stream (reading and formatting are cheap, and one
    reader is what makes the order reproducible); tokenisation runs in parallel `map_batches`
    tasks. The tokenizer travels as bytes, so workers need no shared filesystem; corpus paths
    must be readable where the read task runs (local on a laptop, object storage on a cluster).
    """
    specs = as_specs(specs)
    tok = load_tokenizer(tokenizer_dir)
    source = _MixedStream(specs, tok.proto, (max_input_len, max_hyper_len, max_target_len, causal),
                          on_bad_record, seed, epoch)
    ds = ray.data.read_datasource(source, override_num_blocks=1).map_batches(
        tokenize_block, batch_format="pyarrow", batch_size=BLOCK_ROWS, zero_copy_batch=True,
        fn_kwargs={"proto": tok.proto, "max_input_len": max_input_len, "max_hyper_len": max_hyper_len,
                   "max_target_len": max_target_len, "causal": causal})
    ds.context.execution_options.preserve_order = True
    return ds


class _MixedStream(Datasource):
    """A Ray Data source with one read task: the mixed text stream, streamed in blocks."""

    def __init__(self, specs, proto, limits, on_bad_record, seed, epoch):
        self.args = (specs, proto, limits, on_bad_record, seed, epoch)

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        specs, proto, limits, on_bad_record, seed, epoch = self.args

        def read():
            yield from text_blocks(specs, TokenBudget(tokenizer_from_proto(proto), *limits),
                                   on_bad_record=on_bad_record, seed=seed,
                                   epoch=epoch() if callable(epoch) else epoch)

        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(read, meta, schema=TEXT_SCHEMA, per_task_row_limit=per_task_row_limit)]
