"""Assembling a table of the paper from MLflow: each cell is the newest finished run tagged with
its stage (runner.py), as Markdown and CSV, saved under <run.storage_path>/paper/ and logged to
MLflow as the artifacts of a `paper-<table>-<size>` run.

Runs tables show each cell's metrics (ROUGE-L / exact match or accuracy, GFLOPs per task) and a
per-category breakdown of the headline metric (SNI task categories; P3 held-out datasets).
Table 7 shows the median token lengths measured on the training data; Appendix C computes
FLOPs per task and the task-state memory with hint_model.flops at Table 7's medians.
"""

from __future__ import annotations

import csv
import io
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow

from hint_model.flops import gflops_per_task, task_cost
from hint_platform.config import model_config
from hint_platform.errors import UserError
from hint_platform.paper.plan import LENGTHS, Table
from hint_platform.paper.runner import paper_tags, plan_for, tagged_run
from hint_platform.paper.stages import Resolved, resolve
from hint_platform.tracking import runs

FLOPS_INPUTS = 100  # inputs a task (SNI's test tasks have 100 each)
LABELS = {"rougeL": "ROUGE-L", "exact_match": "EM", "accuracy": "Acc.", "gflops_per_task": "GFLOPs",
          "instruction": "instruction", "input": "input", "output": "output",
          "hint_gflops": "HINT GFLOPs", "concat_gflops": "concat GFLOPs", "speedup": "concat/HINT",
          "hint_state_mib": "HINT state MiB", "kv_cache_mib": "KV cache MiB"}


@dataclass
class Assembled:
    table: Table
    size: str
    header: list[str]
    rows: list[list]  # label, then numbers (None: no finished run)
    breakdown_header: list[str] = field(default_factory=list)
    breakdown: list[list] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # run names with no finished run

    def markdown(self) -> str:
        lines = [f"### {self.table.title} ({self.size})", "", *_markdown(self.header, self.rows)]
        if self.breakdown:
            lines += ["", "Per category:", "", *_markdown(self.breakdown_header, self.breakdown)]
        if self.table.note:
            lines += ["", self.table.note]
        if self.missing:
            lines += ["", "No finished run yet: " + ", ".join(self.missing)]
        return "\n".join(lines) + "\n"

    def csv(self) -> str:
        out = io.StringIO()
        writer = csv.writer(out)
        writer.writerow(self.header)
        writer.writerows([[_csv(v) for v in row] for row in self.rows])
        return out.getvalue()


def assemble(table: Table, size: str, overrides: list[str], checkpoint: str | None = None) -> Assembled:
    if table.kind == "flops":
        return _flops(table, size, overrides, checkpoint)
    by_name = {s.stage.name: s for s in plan_for(table, size, overrides, checkpoint)}
    kind = "lengths" if table.kind == "lengths" else "eval"
    columns = table.columns
    first = "data" if kind == "lengths" else "model"
    header = [first] + [_column(c, m, len(columns)) for c in columns for m in table.metrics]
    rows, found, missing = [], {}, []
    for row in table.rows:
        values: list = [row.label]
        cells = dict(row.cells)
        for column in columns:
            run = None
            if column in cells:
                stage = by_name[cells[column].name]
                run = tagged_run(stage.cfg, paper_tags(stage, kind))
                if run is None or run.info.status != "FINISHED":
                    missing.append(stage.name)
                    run = None
                else:
                    found[(row.label, column)] = run
            prefix = "median_" if kind == "lengths" else "eval/"
            values += [run.data.metrics.get(prefix + m) if run else None for m in table.metrics]
        rows.append(values)
    assembled = Assembled(table, size, header, rows, missing=missing)
    if kind == "eval" and found:
        _breakdown(assembled, found, runs.resolve_tracking_uri(next(iter(by_name.values())).cfg))
    return assembled


def _breakdown(assembled: Assembled, found: dict, uri: str) -> None:
    """Rows: categories; columns: each cell; values: the headline metric, read from each
    evaluation's saved metrics.json (MLflow metric keys lose a category's slashes)."""
    metric = assembled.table.metrics[0]
    per_cell = {}
    with runs.mlflow_client(uri) as client:
        for cell, run in found.items():
            with tempfile.TemporaryDirectory() as tmp:
                path = client.download_artifacts(run.info.run_id, "eval/metrics.json", tmp)
                per_cell[cell] = json.loads(Path(path).read_text())["per_category"]
    categories = sorted({c for table in per_cell.values() for c in table})
    if not categories:
        return
    multi = len(assembled.table.columns) > 1
    assembled.breakdown_header = [f"category ({LABELS.get(metric, metric)})"] + [
        f"{label} {column}" if multi else label for label, column in per_cell]
    assembled.breakdown = [[c] + [table.get(c, {}).get(metric) for table in per_cell.values()]
                           for c in categories]


def _flops(table: Table, size: str, overrides: list[str], checkpoint: str | None) -> Assembled:
    """Appendix C at Table 7's medians: HINT reads the instruction once a task, the
    concatenation baseline with every input (its input holds the instruction)."""
    header = ["setting"] + [LABELS[m] for m in table.metrics]
    rows, missing = [], []
    for row in table.rows:
        cells = dict(row.cells)
        hint, concat = (resolve(cells[c], size, overrides, checkpoint=checkpoint) for c in ("", "concat"))
        lengths = {c: _medians(cells[c], overrides, checkpoint) for c in ("", "concat")}
        absent = [name for name, medians in lengths.values() if medians is None]
        if absent:
            missing += [f"{name} (run `hint paper run {LENGTHS.key}` first)" for name in absent]
            rows.append([row.label] + [None] * len(table.metrics))
            continue
        (t, i, o), (_, i_concat, _) = lengths[""][1], lengths["concat"][1]
        hint_cfg = model_config(hint.cfg)
        hint_gflops = gflops_per_task(hint_cfg, FLOPS_INPUTS, i=i, t=t, target_len=o)
        # the baseline's measured input holds the instruction already
        concat_gflops = gflops_per_task(model_config(concat.cfg), FLOPS_INPUTS, i=i_concat, t=0, target_len=o)
        memory = task_cost(hint_cfg, FLOPS_INPUTS, t, i, o)
        rows.append([row.label, hint_gflops, concat_gflops, concat_gflops / hint_gflops,
                     memory.hint_state_bytes / 2**20, memory.kv_cache_bytes / 2**20])
    return Assembled(table, size, header, rows, missing=list(dict.fromkeys(missing)))


def _medians(stage, overrides: list[str], checkpoint: str | None):
    """(run name, (instruction, input, output) medians Table 7 measured for `stage`, or None)."""
    resolved: Resolved = resolve(stage, LENGTHS.sizes[0], overrides, checkpoint=checkpoint)
    run = tagged_run(resolved.cfg, paper_tags(resolved, "lengths"))
    if run is None or run.info.status != "FINISHED":
        return resolved.name, None
    m = run.data.metrics
    return resolved.name, tuple(round(m[f"median_{k}"]) for k in ("instruction", "input", "output"))


def save_and_log(assembled: Assembled, overrides: list[str], checkpoint: str | None = None) -> tuple[Path, str]:
    """Writes <storage>/paper/<table>-<size>.md and .csv and logs them to MLflow; returns the
    directory and the run id."""
    table, size = assembled.table, assembled.size
    anchor = resolve(table.rows[0].cells[0][1], size if size in table.sizes else table.sizes[0],
                     overrides, checkpoint=checkpoint).cfg
    out = runs.storage_dir(anchor) / "paper"
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{table.key}-{size}"
    (out / f"{stem}.md").write_text(assembled.markdown())
    (out / f"{stem}.csv").write_text(assembled.csv())
    if assembled.breakdown:
        with open(out / f"{stem}-categories.csv", "w", newline="") as f:
            csv.writer(f).writerows([assembled.breakdown_header,
                                     *[[_csv(v) for v in r] for r in assembled.breakdown]])
    uri = runs.resolve_tracking_uri(anchor)
    with runs.experiment_run(uri, anchor.run.experiment, f"paper-{stem}",
                             tags={"hint.paper.table": table.key},
                             artifact_location=runs.artifact_location(anchor, uri)) as run:
        for suffix in (".md", ".csv", "-categories.csv"):
            if (out / f"{stem}{suffix}").is_file():
                mlflow.log_artifact(str(out / f"{stem}{suffix}"), artifact_path="paper")
    return out, run.info.run_id


def require_complete(assembled: Assembled) -> None:
    if assembled.missing:
        how = "" if assembled.table.kind == "flops" else f" (`hint paper run {assembled.table.key}`)"
        raise UserError(f"{assembled.table.key}: no finished run for {', '.join(assembled.missing)}{how}")


def _column(column: str, metric: str, columns: int) -> str:
    label = LABELS.get(metric, metric)
    return label if columns == 1 or not column else f"{column} {label}"


def _markdown(header: list[str], rows: list[list]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
            *["| " + " | ".join(_text(v) for v in row) + " |" for row in rows]]


def _text(value) -> str:
    if value is None:
        return "-"
    return f"{value:.2f}" if isinstance(value, float) else str(value)


def _csv(value) -> str:
    return "" if value is None else (f"{value:.4f}" if isinstance(value, float) else str(value))
