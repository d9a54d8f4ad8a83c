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
of consumed example_index values, hint_platform/training/state.py), and a pass can go on from a
position saved in it without reading what came before (pipelines/mixing.py).

The causal layout (`causal=True`, for a decoder-only model: the platform chooses it from the
model, never the user): the instruction and the input end WITHOUT an EOS (the prompt goes on),
the first non-empty of them starts with the tokenizer's BOS (OPT's, Llama's; GPT-2 has none),
the target ends with the EOS. SNI `concat` then puts Tk-Instruct's instruction part
(definition + examples) in `hyper_input_ids` and the instance with its `Output:` cue in
`input_ids`, so that the model can compute the instruction's key/values once per task
(pipelines.sni). `collate(rows, causal=True)` makes the batches.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pyarrow as pa
import ray.data
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipelines.bad_records import BadRecords
from pipelines.budget import TokenBudget
from pipelines.mixing import MixedStream
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


def text_blocks(specs: list[SourceSpec], budget: TokenBudget, *, on_bad_record: str, seed: int,
                bad: BadRecords | None = None, epoch: int = 0, num_epochs: int = 1,
                start: dict | None = None, on_block: Callable[[dict], None] | None = None
                ) -> Iterator[pa.Table]:
    """The mixed stream of passes epoch, epoch + 1, ... (`num_epochs` of them) as Arrow tables of
    TEXT_SCHEMA, at most BLOCK_ROWS rows each (a block never spans two passes). `budget` holds
    the lengths tokenize_block will cut to: the readers drop what would not fit first. Bad
    records are counted per pass unless `bad` is given. `start`: a position in pass `epoch`
    (pipelines/mixing.py) to go on from; `on_block(position)` is called with the position each
    block starts at, before the block is given."""
    for e in range(epoch, epoch + num_epochs):
        yield from _pass_blocks(MixedStream(specs, budget, bad or BadRecords(on_bad_record), seed, e,
                                            start if e == epoch else None), on_block)


def _pass_blocks(stream: MixedStream, on_block: Callable[[dict], None] | None) -> Iterator[pa.Table]:
    bad = stream.bad
    while True:
        position = stream.position() if on_block else None
        first = stream.index
        chunk = list(itertools.islice(stream, BLOCK_ROWS))
        if not chunk:
            if bad.skipped:
                log.warning("data: %d bad record(s) skipped: %s", bad.skipped,
                            ", ".join(f"{source} ({n})" for source, n in bad.by_source.items()))
            return
        if on_block:
            on_block(position)
        columns: dict[str, list[Any]] = {name: [] for name in TEXT_SCHEMA.names}
        for index, ex in enumerate(chunk, first):
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
        columns["epoch"] = [stream.epoch] * len(chunk)
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
                  seed: int = 0, causal: bool = False, epoch: int | Callable[[], int] = 0,
                  start: dict | None = None, on_block: Callable[[dict], None] | None = None):
    """A ray.data.Dataset of the rows of pass `epoch` (see the module docstring), in
    deterministic order. `epoch` may be a callable (picklable) that the read task calls at each
    execution of the dataset: a dataset read again for every pass (the trainer's) learns its
    pass there. An execution reading the pass of `start` (a position, pipelines/mixing.py)
    begins there; `on_block` (picklable) gets the position of every block (text_blocks).

    One read task produces the mixed text stream (reading and formatting are cheap, and one
    reader is what makes the order reproducible); tokenisation runs in parallel `map_batches`
    tasks. The tokenizer travels as bytes, so workers need no shared filesystem; corpus paths
    must be readable where the read task runs (local on a laptop, object storage on a cluster).
    """
    specs = as_specs(specs)
    tok = load_tokenizer(tokenizer_dir)
    source = _MixedStream(specs, tok.proto, (max_input_len, max_hyper_len, max_target_len, causal),
                          on_bad_record, seed, epoch, start, on_block)
    ds = ray.data.read_datasource(source, override_num_blocks=1).map_batches(
        tokenize_block, batch_format="pyarrow", batch_size=BLOCK_ROWS, zero_copy_batch=True,
        fn_kwargs={"proto": tok.proto, "max_input_len": max_input_len, "max_hyper_len": max_hyper_len,
                   "max_target_len": max_target_len, "causal": causal})
    ds.context.execution_options.preserve_order = True
    return ds


class _MixedStream(Datasource):
    """A Ray Data source with one read task: the mixed text stream, streamed in blocks."""

    def __init__(self, specs, proto, limits, on_bad_record, seed, epoch, start, on_block):
        self.args = (specs, proto, limits, on_bad_record, seed, epoch, start, on_block)

    def estimate_inmemory_data_size(self):
        return None

    def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
        specs, proto, limits, on_bad_record, seed, epoch, start, on_block = self.args

        def read():
            e = epoch() if callable(epoch) else epoch
            yield from text_blocks(specs, TokenBudget(tokenizer_from_proto(proto), *limits),
                                   on_bad_record=on_bad_record, seed=seed, epoch=e,
                                   start=start if start and start["epoch"] == e else None,
                                   on_block=on_block)

        meta = BlockMetadata(num_rows=None, size_bytes=None, exec_stats=None, input_files=None)
        return [ReadTask(read, meta, schema=TEXT_SCHEMA, per_task_row_limit=per_task_row_limit)]
