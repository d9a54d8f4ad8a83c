"""Evaluation: SNI generation metrics and P3 rank classification, per task, category and overall.

The metrics follow the official definitions so that numbers compare with the papers:
- SNI (natural-instructions `eval/automatic/evaluation.py`): ROUGE-L F-measure from
  `rouge-score` with the Porter stemmer, and exact match after the SQuAD-style normalisation
  that SNI adapted (lowercase, drop punctuation, squeeze whitespace; SNI deliberately keeps
  articles). Each prediction takes its best score over its references; means are x100.
- P3 (T0): rank classification. The answer choice with the highest sequence log-likelihood is the
  prediction; accuracy is averaged over the examples of a template, then over the templates of
  a dataset, then over datasets.

`predict_records` runs a model over evaluation records task by task: the task's modules are
generated ONCE (`TaskModules`) and every input of the task reuses them, as a HINT deployment
would.
"""

from __future__ import annotations

import json
import string
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import mlflow
import torch
from rouge_score import rouge_scorer

from hint_model import HintModel
from hint_model.flops import task_cost
from hint_platform.errors import UserError
from hint_platform.tracking import tracking_uri_scope
from pipelines import SourceSpec, iter_records, load_tokenizer

EXPORT_TOKENIZER = "tokenizer"  # an export directory holds its tokenizer here (train.fit writes it)
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


# --- running a model over evaluation records ---------------------------------------------------

@dataclass
class EvalReport:
    """Metrics overall, per task and per category, and every prediction made."""

    overall: dict[str, float]
    per_task: dict[str, dict[str, float]]
    per_category: dict[str, dict[str, float]] = field(default_factory=dict)
    predictions: list[dict[str, Any]] = field(default_factory=list)

    def flat_metrics(self, prefix: str = "eval") -> dict[str, float]:
        """`eval/rougeL`, `eval/task/<task>/rougeL`, ...: names MLflow accepts as metric keys."""
        out = {f"{prefix}/{k}": v for k, v in self.overall.items()}
        for group, table in (("task", self.per_task), ("category", self.per_category)):
            for name, metrics in table.items():
                safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in name)
                out.update({f"{prefix}/{group}/{safe}/{k}": v for k, v in metrics.items()})
        return out


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
    ids = torch.tensor([hyper_input_ids], dtype=torch.long)
    return model.generate_modules(ids, torch.ones_like(ids))


@torch.no_grad()
def generate_outputs(model, tokenizer, modules, input_ids: list[list[int]], *,
                     batch_size: int = 16, max_new_tokens: int = 64) -> list[str]:
    """Greedy outputs for inputs of ONE task, every batch reusing that task's modules."""
    outputs = []
    for start in range(0, len(input_ids), batch_size):
        ids, mask = _pad(input_ids[start:start + batch_size], tokenizer.pad_id)
        tokens = model.generate(ids, mask, modules=modules, max_new_tokens=max_new_tokens)
        outputs += [tokenizer.decode(row) for row in tokens.tolist()]
    return [o.strip() for o in outputs]


@torch.no_grad()
def choose_answers(model, tokenizer, modules, records: list[dict], *, batch_size: int = 16) -> list[int]:
    """Rank classification: per record, the index of the answer choice with the highest log-likelihood."""
    pairs = [(r["input_ids"], choice) for r in records for choice in r["answer_choices"]]
    scores = []
    for start in range(0, len(pairs), batch_size):
        chunk = pairs[start:start + batch_size]
        ids, mask = _pad([p[0] for p in chunk], tokenizer.pad_id)
        labels, _ = _pad([tokenizer.encode(choice) for _, choice in chunk], -100)
        scores += model.score(ids, mask, labels, modules=modules).tolist()
    choices, at = [], 0
    for r in records:
        n = len(r["answer_choices"])
        row = scores[at:at + n]
        choices.append(max(range(n), key=row.__getitem__))
        at += n
    return choices


def predict_records(model, tokenizer, records: Iterable[dict], *, batch_size: int = 16,
                    max_new_tokens: int = 64, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Predictions for evaluation records (generation ones with `references`, rank
    classification ones with `answer_choices`), generating each task's modules once."""
    model.eval()
    groups = group_by_instruction(records)
    if not groups:
        raise ValueError("evaluate_records: no evaluation records")
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
        overall["accuracy"] = rank_classification_accuracy(
            (*split_p3_task(p["task"], p3_datasets), p["choice"] == p["answer_index"]) for p in chosen)["accuracy"]
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


def _pad(seqs: list[list[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, :len(s)] = 1
    return ids, mask


def sni_categories(tasks_dir: str | Path, tasks: Iterable[str]) -> dict[str, str]:
    """Task name -> category, from the `Categories` field of the SNI task files (`<task>.json`)."""
    out = {}
    for task in tasks:
        path = Path(tasks_dir) / f"{task}.json"
        if path.is_file():
            with open(path, encoding="utf-8") as f:
                cats = json.load(f).get("Categories") or []
            if cats:
                out[task] = cats[0]
    return out


def evaluate_export(export_dir: str | Path, cfg, *, batch_size: int = 16, max_new_tokens: int = 64,
                    progress: Callable[[str], None] | None = None) -> EvalReport:
    """The export's model on the evaluation sources of experiment config `cfg` (data.eval, the
    lengths), tokenised with the export's own tokenizer. SNI tasks are grouped by category."""
    specs = [SourceSpec.from_dict(d, where=f"data.eval[{i}]") for i, d in enumerate(cfg.data.eval)]
    if not specs:
        raise UserError("data.eval lists no evaluation sources (add e.g. {kind: sni, path: ..., part: test})")
    model = HintModel.from_pretrained(str(export_dir))
    tokenizer_dir = str(Path(export_dir) / EXPORT_TOKENIZER)
    records = list(iter_records(specs, tokenizer_dir, max_input_len=cfg.data.max_input_len,
                                max_hyper_len=cfg.data.max_hyper_len, max_target_len=cfg.data.max_target_len,
                                on_bad_record=cfg.data.on_bad_record, seed=cfg.data.seed))
    predictions = predict_records(model, load_tokenizer(tokenizer_dir), records, batch_size=batch_size,
                                  max_new_tokens=max_new_tokens, progress=progress)
    tasks = {p["task"] for p in predictions}
    categories: dict[str, str] = {}
    p3_datasets: dict[str, str] = {}
    for spec in specs:
        if spec.kind == "sni":
            categories.update(sni_categories(Path(spec.path) / "tasks", tasks))
        if spec.kind == "p3":
            p3_datasets.update({t: spec.dataset for t in tasks if t.startswith(f"{spec.dataset}/")})
    report = score_predictions(predictions, categories, p3_datasets)
    report.overall["gflops_per_task"] = gflops_per_task(model.config, records)
    return report


def gflops_per_task(model_config, records: list[dict]) -> float:
    """Mean inference GFLOPs per task (hint_model.flops, the paper's Appendix C) at each task's
    mean token lengths. A hypernetwork variant encodes the instruction once per task; any other
    variant pays for its input only (for concatenation that input holds the instruction)."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    costs = []
    for rows in by_task.values():
        n = len(rows)
        t, i, o = (round(sum(len(r[k]) for r in rows) / n) for k in ("hyper_input_ids", "input_ids", "labels"))
        cost = task_cost(model_config, n, t if model_config.hypernetwork else 0, i, o)
        costs.append(cost.hint if model_config.hypernetwork else cost.concat)
    return sum(costs) / len(costs) / 1e9


def save_report(report: EvalReport, out_dir: str | Path) -> Path:
    """out_dir/predictions.jsonl (one prediction a line) and out_dir/metrics.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "predictions.jsonl", "w", encoding="utf-8") as f:
        for p in report.predictions:
            f.write(json.dumps(p, ensure_ascii=False) + "\n")
    metrics = {"overall": report.overall, "per_category": report.per_category, "per_task": report.per_task}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    return out


def log_report(report: EvalReport, out_dir: str | Path, *, tracking_uri: str, experiment: str,
               run_name: str, artifact_location: str | None = None) -> str:
    """An MLflow run holding the evaluation's metrics and its saved files; returns the run id."""
    with tracking_uri_scope(tracking_uri):
        if mlflow.get_experiment_by_name(experiment) is None:
            mlflow.create_experiment(experiment, artifact_location=artifact_location)
        mlflow.set_experiment(experiment)
        with mlflow.start_run(run_name=run_name) as run:
            mlflow.log_metrics(report.flat_metrics())
            mlflow.log_artifacts(str(out_dir), artifact_path="eval")
    return run.info.run_id
