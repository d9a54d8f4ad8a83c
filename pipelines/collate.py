"""Batches for the model: pad each batch to its longest sequence (labels with -100).

`collate` takes a list of rows (dicts) or a columnar batch (a dict of arrays, what Ray Data's
`iter_batches` / `iter_torch_batches(collate_fn=...)` hand over). `step_micro_batches` cuts the
rows of one training step so that each micro-batch holds few instructions and little padding.

Two layouts, so that `model(**batch).logits` lines up with `batch["labels"]` for both model
kinds: T5's (the decoder's inputs are the labels shifted right, the model's job), and the
causal one of a decoder-only model (`causal=True`): the row's input (the prompt without the
instruction) followed by its target but the last token, right-padded, with
`labels = [-100] * (len(prompt) - 1) + target`, so `labels[:, j]` is the token after
`input_ids[:, j]` and the loss covers the target and its EOS only (Appendix D).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

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


def collate(rows: Sequence[Mapping[str, Any]] | Mapping[str, Sequence], pad_id: int = 0, *,
            causal: bool = False) -> dict[str, torch.Tensor]:
    """The model's inputs: hyper_input_ids / hyper_attention_mask [T, L] with one row per
    distinct instruction (in order of first appearance), task_index [B] (each example's row),
    input_ids, attention_mask, labels (-100 padded); `causal`: the decoder-only layout (module
    docstring). `pad_id`: the tokenizer's (padding is masked: any id of the vocabulary does).

    Grouping by instruction happens here, on the CPU, so that the model's forward never asks
    the accelerator which instructions are equal (torch.unique would wait for it)."""
    if isinstance(rows, Mapping):
        columns = rows
    else:
        columns = {key: [row[key] for row in rows] for key in ("hyper_input_ids", "input_ids", "labels")}
    inputs, labels = columns["input_ids"], columns["labels"]
    if causal:
        inputs, labels = _causal(inputs, labels)
    rows_of: dict[tuple, int] = {}
    task_index = [rows_of.setdefault(tuple(map(int, h)), len(rows_of))
                  for h in columns["hyper_input_ids"]]
    hyper = list(rows_of)
    hyper_ids, input_ids = _pad(hyper, pad_id), _pad(inputs, pad_id)
    return {
        "hyper_input_ids": hyper_ids,
        "hyper_attention_mask": _mask(hyper, hyper_ids.shape[1]),
        "task_index": torch.tensor(task_index, dtype=torch.long),
        "input_ids": input_ids,
        "attention_mask": _mask(inputs, input_ids.shape[1]),
        "labels": _pad(labels, IGNORE_INDEX),
    }


def _causal(prompts: Sequence[Sequence[int]], targets: Sequence[Sequence[int]]) -> tuple[list, list]:
    inputs, labels = [], []
    for prompt, target in zip(prompts, targets):
        prompt, target = list(prompt), list(target)
        if not prompt or not target:
            raise ValueError("collate(causal=True): every row needs a non-empty input and target "
                             f"(got {len(prompt)} input and {len(target)} target tokens)")
        inputs.append(prompt + target[:-1])
        labels.append([IGNORE_INDEX] * (len(prompt) - 1) + target)
    return inputs, labels


def instruction_then_length(row: Mapping[str, Any]) -> tuple:
    """Rows of one instruction side by side (HINT encodes each distinct instruction of a batch
    once), instructions of similar length together, then inputs and targets by length."""
    hyper = row["hyper_input_ids"]
    return len(hyper), tuple(hyper), len(row["input_ids"]), len(row["labels"])


def step_micro_batches(rows: list[dict], micro_batch_size: int) -> list[list[dict]]:
    """The rows of one optimizer step as micro-batches of `micro_batch_size`, sorted by
    `instruction_then_length` first. The step's gradient does not depend on how its rows are
    split (its loss is the mean over all of the step's target tokens); the padding and the
    instructions encoded per micro-batch do."""
    return list(_cut(sorted(rows, key=instruction_then_length), micro_batch_size))


def _cut(rows: list[dict], batch_size: int) -> Iterator[list[dict]]:
    for i in range(0, len(rows), batch_size):
        yield rows[i : i + batch_size]


def pad_sequences(seqs: Sequence[Sequence[int]], value: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences padded with `value` to the longest, and their attention mask."""
    ids = _pad(seqs, value)
    return ids, _mask(seqs, ids.shape[1])
