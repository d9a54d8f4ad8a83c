"""Evaluating a model export on an experiment config's evaluation sources (`hint eval`, the
demo, `hint paper run`, a study's trials): predictions task by task in Ray workers
(workers.py over inference.py), metrics per task, category and overall
(metrics.py), inference GFLOPs per task (hint_model.flops), saved and logged to MLflow.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Callable

import mlflow

from hint_model.flops import gflops_per_task, task_cost
from hint_platform import export
from hint_platform.errors import UserError
from hint_platform.evaluation.metrics import EvalReport, score_predictions
from hint_platform.evaluation.workers import EvalWorkers, predict_on_ray
from hint_platform.tracking.runs import experiment_run
from pipelines import SourceSpec, iter_records
from pipelines.sni import sni_categories


def evaluate_export(export_dir: str | Path, cfg, *, batch_size: int = 16, max_new_tokens: int | None = None,
                    workers: EvalWorkers | None = None, records: list[dict] | None = None,
                    progress: Callable[[str], None] | None = None) -> EvalReport:
    """The export's model on the evaluation sources of experiment config `cfg` (data.eval, the
    lengths), tokenised with the export's own tokenizer. SNI tasks are grouped by category.
    Outputs are decoded up to `max_new_tokens`, by default the config's target length (the
    reference evaluates up to 256, gins/ni_eval.gin). The model runs in Ray workers
    (`workers`, default: one per GPU of the cluster), never here: this process reads the
    records and scores the predictions. `records`: eval_records' records, changed by the caller
    (the demo's control gives each task another task's instruction); default: read here."""
    specs = eval_specs(cfg)
    model_config = export.model_config(export_dir)
    records = eval_records(export_dir, cfg) if records is None else records
    predictions, placed = predict_on_ray(export_dir, records, workers or EvalWorkers(), batch_size=batch_size,
                                         max_new_tokens=max_new_tokens or cfg.data.max_target_len,
                                         progress=progress)
    tasks = {p["task"] for p in predictions}
    categories: dict[str, str] = {}
    p3_datasets: dict[str, str] = {}
    for spec in specs:
        if spec.kind == "sni":
            categories.update(sni_categories(Path(spec.path) / "tasks", tasks))
        if spec.kind == "p3":
            p3_datasets.update({t: spec.dataset for t in tasks if t.startswith(f"{spec.dataset}/")})
    report = score_predictions(predictions, categories, p3_datasets)
    report.overall["gflops_per_task"] = mean_gflops_per_task(model_config, records)
    if model_config.caches_instruction:  # a decoder-only concat model: what its cache saves
        report.overall["gflops_per_task_uncached"] = mean_gflops_per_task(model_config, records, cached=False)
        tasks = task_lengths(records)
        report.overall["kv_cache_mib"] = sum(task_cost(model_config, 1, t, i, o).kv_cache_bytes
                                             for _, t, i, o in tasks) / len(tasks) / 2**20
    report.workers = placed
    return report


def eval_specs(cfg) -> list[SourceSpec]:
    specs = [SourceSpec.from_dict(d, where=f"data.eval[{i}]") for i, d in enumerate(cfg.data.eval)]
    if not specs:
        raise UserError("data.eval lists no evaluation sources (add e.g. {kind: sni, path: ..., part: test})")
    return specs


def eval_records(export_dir: str | Path, cfg) -> list[dict]:
    """The records of `cfg`'s evaluation sources as the export's model reads them (its
    tokenizer; the causal layout for a decoder-only model)."""
    return list(iter_records(eval_specs(cfg), str(export.tokenizer_dir(export_dir)),
                             max_input_len=cfg.data.max_input_len, max_hyper_len=cfg.data.max_hyper_len,
                             max_target_len=cfg.data.max_target_len, on_bad_record=cfg.data.on_bad_record,
                             seed=cfg.data.seed, causal=export.model_config(export_dir).is_decoder_only))


def task_lengths(records: list[dict]) -> list[tuple[int, int, int, int]]:
    """(inputs, instruction, input, output tokens) of each task, its mean token lengths as the
    records give them: a T5 concatenation record's input already holds the instruction (and its
    hypernetwork input is empty); a decoder-only one's instruction is apart."""
    by_task: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        by_task[r["task"]].append(r)
    return [(len(rows), *(round(sum(len(r[k]) for r in rows) / len(rows))
                          for k in ("hyper_input_ids", "input_ids", "labels")))
            for rows in by_task.values()]


def mean_gflops_per_task(model_config, records: list[dict], cached: bool = True) -> float:
    """Mean inference GFLOPs per task (hint_model.flops.gflops_per_task, the paper's Appendix C)
    at each task's lengths; `cached=False`: a decoder-only concat model re-reading the
    instruction with every input (the paper's convention for its decoder-only rows)."""
    costs = [gflops_per_task(model_config, n, i=i, t=t, target_len=o, cached_instruction=cached)
             for n, t, i, o in task_lengths(records)]
    return sum(costs) / len(costs)


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
               run_name: str, artifact_location: str | None = None,
               tags: dict[str, str] | None = None) -> str:
    """An MLflow run holding the evaluation's metrics and its saved files; returns the run id."""
    with experiment_run(tracking_uri, experiment, run_name, tags=tags,
                        artifact_location=artifact_location) as run:
        mlflow.log_metrics(report.flat_metrics())
        mlflow.log_artifacts(str(out_dir), artifact_path="eval")
    return run.info.run_id
