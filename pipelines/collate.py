"""Batches for the model: pad each batch to its longest sequence (labels with -100).

`collate` takes a list of rows (dicts) or a columnar batch (a dict of arrays, what Ray Data's
`iter_batches` / `iter_torch_batches(collate_fn=...)` hand over). `length_buckets` groups rows
of similar length so that less of each batch is padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from pipelines.tokenizer import PAD_ID

IGNORE_INDEX = -100


def _pad(seqs: Sequence[Sequence[int]], value: int) -> torch.Tensor:
    # At least one column: an empty instruction (concat / no_instruct) still gives a 2-D tensor.
    width = max(1, max((len(s) for s in seqs), default=0))
    out = torch.full((len(seqs), width), value, dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
    return out


def _mask(seqs: Sequence[Sequence[int]], width: int) -> torch.Tensor:
    lengths = torch.tensor([len(s) for s in seqs])
    return (torch.arange(width)[None, :] < lengths[:, None]).long()


def collate(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence], pad_id: int = PAD_ID) -> dict[str, torch.Tensor]:
    """hyper_input_ids, hyper_attention_mask, input_ids, attention_mask, labels (-100 padded)."""
    if isinstance(rows, Mapping):
        columns = rows
    else:
        columns = {key: [row[key] for row in rows] for key in ("hyper_input_ids", "input_ids", "labels")}
    hyper, inputs, labels = columns["hyper_input_ids"], columns["input_ids"], columns["labels"]
    hyper_ids, input_ids = _pad(hyper, pad_id), _pad(inputs, pad_id)
    return {
        "hyper_input_ids": hyper_ids,
        "hyper_attention_mask": _mask(hyper, hyper_ids.shape[1]),
        "input_ids": input_ids,
        "attention_mask": _mask(inputs, input_ids.shape[1]),
        "labels": _pad(labels, IGNORE_INDEX),
    }


def length_buckets(rows: Iterable[dict], batch_size: int, window: int = 50) -> Iterator[list[dict]]:
    """Batches of rows with similar lengths: rows are read `window` batches at a time, sorted
    by total length within that window, and cut into batches (order is deterministic)."""
    def size(row: dict) -> int:
        return len(row["hyper_input_ids"]) + len(row["input_ids"]) + len(row["labels"])

    pending: list[dict] = []
    for row in rows:
        pending.append(row)
        if len(pending) == batch_size * window:
            yield from _cut(sorted(pending, key=size), batch_size)
            pending = []
    yield from _cut(sorted(pending, key=size), batch_size)


def _cut(rows: list[dict], batch_size: int) -> Iterator[list[dict]]:
    for i in range(0, len(rows), batch_size):
        yield rows[i : i + batch_size]


def pad_sequences(seqs: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences padded with `value` to the longest, and their attention mask."""
    ids = _pad(seqs, value)
    return ids, _mask(seqs, ids.shape[1])
