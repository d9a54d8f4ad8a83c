"""Running a model over the records of evaluation tasks, task by task: each task's modules are
generated ONCE (`TaskModules`) and every input of the task reuses them, as a HINT deployment
would. Generation for records with `references`, rank classification (sequence log-likelihood
of each answer choice) for records with `answer_choices`.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Iterable

import torch

from pipelines.collate import IGNORE_INDEX, pad_sequences


def group_by_instruction(records: Iterable[dict]) -> dict[tuple[str, tuple[int, ...]], list[dict]]:
    """Records keyed by (task, instruction tokens), in stream order: one module generation each."""
    groups: dict[tuple[str, tuple[int, ...]], list[dict]] = defaultdict(list)
    for record in records:
        groups[(record["task"], tuple(record.get("hyper_input_ids") or ()))].append(record)
    return groups


@torch.no_grad()
def task_modules(model, hyper_input_ids: tuple[int, ...]):
    """The task's modules, generated once (variants without a hypernetwork: their static ones)."""
    if not model.config.hypernetwork:
        return model.generate_modules()
    if not hyper_input_ids:
        raise ValueError(f"variant {model.config.variant!r} needs an instruction; the record has none")
    ids = torch.tensor([hyper_input_ids], dtype=torch.long, device=model_device(model))
    return model.generate_modules(ids, torch.ones_like(ids))


def model_device(model) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def generate_outputs(model, tokenizer, modules, input_ids: list[list[int]], *,
                     batch_size: int = 16, max_new_tokens: int | None = None) -> list[str]:
    """Greedy outputs for inputs of ONE task, every batch reusing that task's modules, up to
    `max_new_tokens` (default: the model's target length)."""
    outputs = []
    for start in range(0, len(input_ids), batch_size):
        ids, mask = pad_sequences(input_ids[start:start + batch_size], tokenizer.pad_id)
        device = model_device(model)
        tokens = model.generate(ids.to(device), mask.to(device), modules=modules, max_new_tokens=max_new_tokens)
        outputs += [tokenizer.decode(row) for row in tokens.cpu().tolist()]
    return [o.strip() for o in outputs]


@torch.no_grad()
def choose_answers(model, tokenizer, modules, records: list[dict], *, batch_size: int = 16) -> list[int]:
    """Rank classification: per record, the index of the answer choice with the highest log-likelihood."""
    pairs = [(r["input_ids"], choice) for r in records for choice in r["answer_choices"]]
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, mask = pad_sequences([p[0] for p in chunk], tokenizer.pad_id)
        labels, _ = pad_sequences([tokenizer.encode(choice) for _, choice in chunk], IGNORE_INDEX)
        device = model_device(model)
        scores += model.score(ids.to(device), mask.to(device), labels.to(device), modules=modules).float().cpu().tolist()
    choices, at = [], 0
    for r in records:
        n = len(r["answer_choices"])
        row = scores[at:at + n]
        choices.append(max(range(n), key=row.__getitem__))
        at += n
    return choices


def predict_records(model, tokenizer, records: Iterable[dict], *, batch_size: int = 16,
                    max_new_tokens: int | None = None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Predictions for evaluation records (generation ones with `references`, rank
    classification ones with `answer_choices`), generating each task's modules once."""
    model.eval()
    groups = group_by_instruction(records)
    if not groups:
        raise ValueError("predict_records: no evaluation records")
    predictions: list[dict[str, Any]] = []
    for i, ((task, hyper), rows) in enumerate(groups.items()):
        modules = task_modules(model, hyper)
        if rows[0].get("answer_choices"):
            picked = choose_answers(model, tokenizer, modules, rows, batch_size=batch_size)
            predictions += [{"task": task, "example_index": r.get("example_index"),
                             "prediction": r["answer_choices"][p], "choice": p,
                             "answer_index": r["answer_index"]} for r, p in zip(rows, picked)]
        else:
            outs = generate_outputs(model, tokenizer, modules, [r["input_ids"] for r in rows],
                                    batch_size=batch_size, max_new_tokens=max_new_tokens)
            predictions += [{"task": task, "example_index": r.get("example_index"), "prediction": o,
                             "references": list(r["references"])} for r, o in zip(rows, outs)]
        if progress:
            progress(f"evaluated task {i + 1}/{len(groups)}: {task} ({len(rows)} examples)")
    return predictions
