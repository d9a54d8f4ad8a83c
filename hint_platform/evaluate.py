"""Evaluation: SNI generation metrics and P3 rank classification, per task, category and overall.

The metrics follow the official definitions so that numbers compare with the papers:
- SNI (natural-instructions `eval/automatic/evaluation.py`): ROUGE-L F-measure from
  `rouge-score` with the Porter stemmer, and exact match after the SQuAD-style normalisation
  that SNI adapted (lowercase, drop punctuation, squeeze whitespace; SNI deliberately keeps
  articles). Each prediction takes its best score over its references; means are x100.
- P3 (T0): rank classification. The answer choice with the highest sequence log-likelihood is the
  prediction; accuracy is averaged over the examples of a template, then over the templates of
  a dataset, then over datasets.

`evaluate_records` runs a model over evaluation records task by task: the task's modules are
generated ONCE (`TaskModules`) and every input of the task reuses them, as a HINT deployment
would.
"""

from __future__ import annotations

import string
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
from rouge_score import rouge_scorer

_PUNCTUATION = set(string.punctuation)
_ROUGE = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def normalize_answer(text: str) -> str:
    """SNI's exact-match normalisation: lowercase, no punctuation, single spaces (articles kept)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(reference))


def rouge_l(prediction: str, reference: str) -> float:
    return _ROUGE.score(target=reference, prediction=prediction)["rougeL"].fmeasure


def sni_metrics(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Mean exact match and ROUGE-L (x100), each prediction scored against its best reference."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} reference lists")
    if not predictions:
        raise ValueError("sni_metrics: no predictions to score")
    em = rl = 0.0
    for i, (pred, refs) in enumerate(zip(predictions, references)):
        if not isinstance(refs, (list, tuple)) or not refs:
            raise ValueError(f"references[{i}]: expected a non-empty list of strings, got {refs!r}")
        em += max(exact_match(pred, ref) for ref in refs)
        rl += max(rouge_l(pred, ref) for ref in refs)
    n = len(predictions)
    return {"exact_match": round(100.0 * em / n, 4), "rougeL": round(100.0 * rl / n, 4)}


def rank_classification_accuracy(results: Iterable[tuple[str, str, bool]]) -> dict[str, Any]:
    """T0-style accuracy from (dataset, template, correct) triples.

    Returns {"accuracy": mean over datasets, "per_dataset": {dataset: mean over its templates},
    "per_template": {"dataset/template": accuracy}}, all x100.
    """
    hits: dict[tuple[str, str], list[bool]] = defaultdict(list)
    for dataset, template, correct in results:
        hits[(dataset, template)].append(bool(correct))
    if not hits:
        raise ValueError("rank_classification_accuracy: no results to score")
    per_template = {f"{d}/{t}": 100.0 * sum(h) / len(h) for (d, t), h in hits.items()}
    by_dataset: dict[str, list[float]] = defaultdict(list)
    for (d, t), h in hits.items():
        by_dataset[d].append(per_template[f"{d}/{t}"])
    per_dataset = {d: sum(accs) / len(accs) for d, accs in by_dataset.items()}
    return {
        "accuracy": sum(per_dataset.values()) / len(per_dataset),
        "per_dataset": per_dataset,
        "per_template": per_template,
    }
