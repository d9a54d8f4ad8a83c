"""Evaluation metrics, pure functions over predictions: no model, no MLflow.

They follow the official definitions so that numbers compare with the papers:
- SNI (natural-instructions `eval/automatic/evaluation.py`): ROUGE-L F-measure from
  `rouge-score` with the Porter stemmer, and exact match after the SQuAD-style normalisation
  that SNI adapted (lowercase, drop punctuation, squeeze whitespace; SNI deliberately keeps
  articles). Each prediction takes its best score over its references; means are x100.
- P3 (T0): rank classification. The answer choice with the highest sequence log-likelihood is the
  prediction; accuracy is averaged over the examples of a template, then over the templates of
  a dataset, then over datasets.
"""

from __future__ import annotations

import string
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Iterable

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


@dataclass
class EvalReport:
    """Metrics overall, per task and per category, and every prediction made."""

    overall: dict[str, float]
    per_task: dict[str, dict[str, float]]
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)  # where the model ran: pid, node, device

    def flat_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """`eval/rougeL`, `eval/task/<task>/rougeL`, ...: names MLflow accepts as metric keys."""
        out = {f"{prefix}/{k}": v for k, v in self.overall.items()}
        for group, table in (("task", self.per_task), ("category", self.per_category)):
            for name, metrics in table.items():
                safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
                out.update({f"{prefix}/{group}/{safe}/{k}": v for k, v in metrics.items()})
        return out


def score_predictions(predictions: list[dict[str, Any]], categories: dict[str, str] | None = None,
                      p3_datasets: dict[str, str] | None = None) -> EvalReport:
    """Metrics from saved predictions: SNI metrics for generations, accuracy for choices.
    `p3_datasets` maps a P3 task to its dataset (see split_p3_task)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        by_task[p["task"]].append(p)
    per_task = {task: _metrics(rows) for task, rows in by_task.items()}
    categories = categories or {}
    by_category: dict[str, list[dict]] = defaultdict(list)
    for p in predictions:
        if p["task"] in categories:
            by_category[categories[p["task"]]].append(p)
    per_category = {c: _metrics(rows) for c, rows in by_category.items()}
    generated = [p for p in predictions if "references" in p]
    chosen = [p for p in predictions if "choice" in p]
    overall: dict[str, float] = {}
    if generated:
        overall.update(sni_metrics([p["prediction"] for p in generated], [p["references"] for p in generated]))
    if chosen:
        ranked = rank_classification_accuracy(
            (*split_p3_task(p["task"], p3_datasets), p["choice"] == p["answer_index"]) for p in chosen)
        overall["accuracy"] = ranked["accuracy"]
        # T0's held-out datasets are P3's categories: the paper's per-dataset breakdown.
        per_category.update({d: {"accuracy": a} for d, a in ranked["per_dataset"].items()})
    return EvalReport(overall, per_task, per_category, predictions)


def split_p3_task(task: str, datasets: dict[str, str] | None = None) -> tuple[str, str]:
    """P3 task names are `<dataset>/<template>`; the dataset is what accuracy averages over.
    Dataset names (`super_glue/cb`) and template names (`claim true/false/inconclusive`) both
    may hold slashes, so the dataset comes from `datasets` (task -> dataset, known from the
    source specs) where given; else everything before the last slash."""
    if datasets and task in datasets:
        return datasets[task], task[len(datasets[task]) + 1:]
    dataset, _, template = task.rpartition("/")
    return (dataset or task), template


def _metrics(rows: list[dict]) -> dict[str, float]:
    if "references" in rows[0]:
        return sni_metrics([r["prediction"] for r in rows], [r["references"] for r in rows])
    return {"accuracy": 100.0 * sum(r["choice"] == r["answer_index"] for r in rows) / len(rows)}
