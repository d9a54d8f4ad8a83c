"""`hint predict`: batch prediction on Ray Data.

Rows come from the platform's data specs (SNI, P3, the synthetic suite: tokenised by the
pipelines, in the format the spec names) or from JSON-lines / Parquet files with `instruction`
and `input` columns (optional `id`, `task`, `references`). They are sorted by task and run
through `map_batches` over an actor pool, one model and one task-state cache per actor (a
GPU each when the cluster has GPUs, a fraction of a CPU otherwise), so an actor generates a
task's state once however many of its inputs it sees. Output: predictions.parquet (id, task,
input, prediction, references) and, where references exist, metrics.json (ROUGE-L / exact
match per task and overall, the evaluation's own functions), logged to MLflow with the job's
parameters.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlflow
import pyarrow as pa
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import ray
import yaml

from hint_model.checkpoint import read_config
from hint_platform import export
from hint_platform.errors import UserError
from hint_platform.evaluation.metrics import score_predictions
from hint_platform.serving.predictor import CachedPredictor
from hint_platform.tracking.registry import resolve_export
from hint_platform.tracking.runs import experiment_run
from pipelines import SourceSpec, SpecError, iter_records, load_tokenizer

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ROWS = pa.schema([("id", pa.string()), ("task", pa.string()), ("instruction", pa.string()),
                  ("input", pa.string()), ("hyper_input_ids", pa.list_(pa.int32())),
                  ("input_ids", pa.list_(pa.int32())), ("references", pa.list_(pa.string()))])
OUTPUT_COLUMNS = ["id", "task", "input", "prediction", "references"]


@dataclass
class PredictOptions:
    model: str
    sources: list[str]
    output: str
    tracking_uri: str | None = None  # where models:/ resolves and the job is logged
    experiment: str = "hint-predict"
    max_new_tokens: int | None = None  # None: the model's target length
    num_beams: int = 1
    batch_size: int = 16
    concurrency: int = 1  # actors (one model each)
    actor_cpus: float = 0.5  # per actor when the cluster has no GPU
    cache_mib: float = 256.0
    max_input_len: int = 1024
    params: dict[str, Any] = field(default_factory=dict)


class PredictActor:
    """One model per actor; `__call__` fills in `prediction` for a batch of rows."""

    def __init__(self, model: str, tracking_uri: str | None, kwargs: dict):
        self.predictor = CachedPredictor(resolve_export(model, tracking_uri), **kwargs)

    def __call__(self, batch: dict) -> dict:
        keys, input_ids = [], []
        for instruction, text, hyper, ids, row_id in zip(batch["instruction"], batch["input"],
                                                         batch["hyper_input_ids"], batch["input_ids"], batch["id"]):
            if instruction:  # a file row: text, formatted and tokenised as the model expects
                try:
                    keys.append(self.predictor.task_key(instruction))
                except UserError as e:
                    raise UserError(f"row {row_id}: {e}") from None
                input_ids.append(self.predictor.input_ids(instruction, text))
            else:  # a data-spec row: tokenised by the pipeline in the spec's format
                keys.append(tuple(int(t) for t in hyper))
                input_ids.append([int(t) for t in ids])
        misses = self.predictor.cache.stats.misses
        batch["prediction"] = self.predictor.predict_tokens(keys, input_ids)
        generated = self.predictor.cache.stats.misses - misses
        batch["task_states_generated"] = [generated] + [0] * (len(keys) - 1)
        return batch


def parse_source(text: str) -> SourceSpec | Path:
    """A JSON-lines / Parquet file, or a data spec as YAML (`{kind: sni, path: ..., part: test}`)."""
    if text.endswith(FILE_SUFFIXES):
        path = Path(text)
        if not path.is_file():
            raise UserError(f"source {text}: no such file")
        return path
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise UserError(f"source {text!r}: neither a .jsonl/.parquet file nor a YAML data spec ({e})") from None
    if not isinstance(data, dict):
        raise UserError(f"source {text!r}: neither a .jsonl/.parquet file nor a data spec "
                        "(e.g. '{kind: sni, path: ../shared/data/sni, part: test}')")
    try:
        return SourceSpec.from_dict({"part": "test", **data}, where=f"source {text!r}")
    except SpecError as e:
        raise UserError(str(e)) from None


def read_rows(sources: list[str], export_dir: Path, max_input_len: int) -> pa.Table:
    """Every source's rows in the ROWS schema, on the driver (ids are the file's line numbers
    or the spec's example index, so they are stable across runs)."""
    cfg = read_config(export_dir)
    tokenizer_dir = export.tokenizer_dir(export_dir)
    tables = []
    for text in sources:
        source = parse_source(text)
        if isinstance(source, Path):
            tables.append(_file_rows(source))
        else:
            records = iter_records([source], str(tokenizer_dir), max_input_len=max_input_len,
                                   max_hyper_len=cfg.max_hyper_len, max_target_len=cfg.max_target_len,
                                   causal=cfg.is_decoder_only)
            tok = load_tokenizer(tokenizer_dir)
            rows = [{"id": f"{r['task']}#{r['example_index']}", "task": r["task"], "instruction": "",
                     "input": tok.decode(r["input_ids"]), "hyper_input_ids": r["hyper_input_ids"],
                     "input_ids": r["input_ids"], "references": r["references"]} for r in records]
            tables.append(pa.Table.from_pylist(rows, schema=ROWS))
    table = pa.concat_tables(tables)
    if table.num_rows == 0:
        raise UserError(f"sources {', '.join(sources)}: no rows")
    return table


def _file_rows(path: Path) -> pa.Table:
    try:
        table = pq.read_table(path) if path.suffix == ".parquet" else pa_json.read_json(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{path}: not readable as {path.suffix[1:]}: {e}") from None
    missing = [c for c in ("instruction", "input") if c not in table.column_names]
    if missing:
        raise UserError(f"{path}: missing column(s) {', '.join(missing)} (columns: "
                        f"{', '.join(table.column_names)}; expected instruction, input [, id, task, references])")
    columns = table.to_pydict()
    n = table.num_rows
    instructions = [str(x or "") for x in columns["instruction"]]
    for i, instruction in enumerate(instructions):
        if not instruction.strip():
            raise UserError(f"{path}: row {i}: empty instruction")
    tasks = columns.get("task") or [hashlib.sha256(t.encode()).hexdigest()[:12] for t in instructions]
    references = columns.get("references") or [[]] * n
    return pa.Table.from_pydict({
        "id": [str(x) for x in columns["id"]] if "id" in columns else [f"{path.name}:{i}" for i in range(n)],
        "task": [str(t) for t in tasks], "instruction": instructions,
        "input": [str(x or "") for x in columns["input"]], "hyper_input_ids": [[]] * n, "input_ids": [[]] * n,
        "references": [[r] if isinstance(r, str) else list(r or []) for r in references]}, schema=ROWS)


def predict(opts: PredictOptions, *, log_run: bool = True,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the job on the current Ray; returns a summary (paths, metrics, run id). With
    `log_run` and a tracking URI, the job is an MLflow run (parameters, metrics, files)."""
    start = time.perf_counter()
    export = resolve_export(opts.model, opts.tracking_uri)
    table = read_rows(opts.sources, export, opts.max_input_len)
    tasks = len(set(table.column("task").to_pylist()))
    gpus = int(ray.cluster_resources().get("GPU", 0))
    resources = {"num_gpus": 1} if gpus else {"num_cpus": opts.actor_cpus}
    concurrency = min(opts.concurrency, gpus) if gpus else opts.concurrency
    progress(f"predicting {table.num_rows} rows of {tasks} tasks with {concurrency} actor(s) "
             f"({'1 GPU' if gpus else f'{opts.actor_cpus} CPU'} each)")
    kwargs = dict(cache_mib=opts.cache_mib, max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams,
                  batch_size=opts.batch_size, max_input_len=opts.max_input_len)
    # Sorted by task: an actor's batches hold few tasks, and its cache keeps each one's state.
    ds = ray.data.from_arrow(table).sort("task").map_batches(
        PredictActor, fn_constructor_args=(opts.model, opts.tracking_uri, kwargs),
        batch_size=opts.batch_size * 4, concurrency=concurrency, batch_format="numpy",
        **resources)
    result = ds.to_pandas()
    out = Path(opts.output)
    out.mkdir(parents=True, exist_ok=True)
    result = result.sort_values(["task", "id"], kind="stable")
    frame = result[OUTPUT_COLUMNS].copy()
    frame["references"] = [list(r) for r in frame["references"]]
    frame.to_parquet(out / "predictions.parquet", index=False)
    summary: dict[str, Any] = {
        "rows": int(len(frame)), "tasks": tasks, "actors": concurrency,
        "task_states_generated": int(result["task_states_generated"].sum()),
        "seconds": round(time.perf_counter() - start, 2), "predictions": str(out / "predictions.parquet")}
    scored = [{"task": t, "prediction": p, "references": list(r)}
              for t, p, r in zip(frame["task"], frame["prediction"], frame["references"]) if len(r)]
    if scored:
        report = score_predictions(scored)
        metrics = {"overall": report.overall, "per_task": report.per_task}
        (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
        summary["metrics"] = metrics
    if log_run and opts.tracking_uri:
        summary["mlflow_run_id"] = _log(opts, summary, out)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _log(opts: PredictOptions, summary: dict[str, Any], out: Path) -> str:
    with experiment_run(opts.tracking_uri, opts.experiment, "predict") as run:
        params = {k: v for k, v in asdict(opts).items() if k not in ("params", "tracking_uri")}
        params["sources"] = " ".join(opts.sources)[:6000]
        mlflow.log_params({**params, **opts.params})
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        metrics = summary.get("metrics", {})
        flat.update({f"predict/{k}": v for k, v in metrics.get("overall", {}).items()})
        for task, values in metrics.get("per_task", {}).items():
            safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in task)
            flat.update({f"predict/task/{safe}/{k}": v for k, v in values.items()})
        mlflow.log_metrics(flat)
        mlflow.log_artifacts(str(out), artifact_path="predict")
    return run.info.run_id
