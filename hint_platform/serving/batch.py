"""`hint predict`: batch prediction on Ray Data.

Rows come from the platform's data specs (SNI, P3, the synthetic suite: tokenised by the
pipelines, in the format the spec names) or from JSON-lines / Parquet files with `instruction`
and `input` columns (optional `id`, `task`, `references`). They are checked on the driver
before any model work (an empty or too long instruction names its row), sorted by task and run
through `map_batches` over an actor pool, one model and one task-state cache per actor (a GPU
each when the cluster has GPUs, a fraction of a CPU otherwise), so an actor generates a task's
state once however many of its inputs it sees. Actors are restarted at most `max_restarts`
times (a crashed or OOM-killed one), then the job fails.

Output (batch_output.py): each actor writes the batches it finishes as Parquet parts; the
driver never holds the predictions. A rerun of the same command predicts only what no part
holds. When all rows are done: OUT/predictions.parquet (id, task, input, prediction,
references), each row once, and where rows have references OUT/metrics.json (ROUGE-L / exact
match per task and overall, the evaluation's own functions), each published by a rename; and
OUT/summary.json. The job's MLflow run gets these files (none left by another run) and its
parameters, redacted.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import mlflow
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.json as pa_json
import pyarrow.parquet as pq
import ray
import yaml

from hint_model.checkpoint import read_config
from hint_platform import export
from hint_platform.errors import UserError
from hint_platform.evaluation.metrics import score_predictions
from hint_platform.placement import model_process_count, model_process_resources
from hint_platform.redact import env_secrets, redact
from hint_platform.serving import batch_output
from hint_platform.serving.predictor import CachedPredictor
from hint_platform.serving.requests import BadRequest, RequestReader
from hint_platform.tracking.registry import resolve_export
from hint_platform.tracking.runs import experiment_run
from pipelines import SourceSpec, SpecError, iter_records, load_tokenizer

FILE_SUFFIXES = (".jsonl", ".json", ".parquet")
ROWS = pa.schema([("id", pa.string()), ("task", pa.string()), ("instruction", pa.string()),
                  ("input", pa.string()), ("hyper_input_ids", pa.list_(pa.int32())),
                  ("input_ids", pa.list_(pa.int32())), ("references", pa.list_(pa.string()))])


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
    cache_mib: float | None = None  # None: sized from the model and device (placement.py)
    max_input_len: int = 1024
    dtype: str | None = None  # None: bf16 on a GPU, fp32 on the CPU
    max_restarts: int = 1  # per actor (crashed, OOM-killed), then the job fails
    max_task_retries: int = 1  # per batch, after its actor died
    params: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if self.max_restarts < 0 or self.max_task_retries < 0:  # -1 is Ray's "forever"
            raise UserError(f"max_restarts and max_task_retries must be >= 0, got {self.max_restarts} "
                            f"and {self.max_task_retries}")

    def job(self, rows: pa.Table) -> dict[str, Any]:
        """What decides the predictions (a rerun with the same resumes): the model, the rows'
        contents and the generation options; not the batching."""
        model = self.model if self.model.startswith("models:/") else str(Path(self.model).resolve())
        sink = pa.BufferOutputStream()
        with pa.ipc.new_stream(sink, rows.schema) as writer:
            writer.write_table(rows)
        return {"model": model, "rows": hashlib.sha256(sink.getvalue()).hexdigest(),
                "max_new_tokens": self.max_new_tokens, "num_beams": self.num_beams,
                "max_input_len": self.max_input_len, "dtype": self.dtype}


class PredictActor:
    """One model per actor; `__call__` predicts a batch of rows and writes them as one part
    into `parts_dir`, returning one row: the part, its rows, the task states it generated."""

    def __init__(self, model: str, tracking_uri: str | None, kwargs: dict, parts_dir: str):
        self.predictor = CachedPredictor(resolve_export(model, tracking_uri), **kwargs)
        self.parts_dir = parts_dir

    def __call__(self, batch: dict) -> dict:
        keys, input_ids = [], []
        for instruction, text, hyper, ids, row_id in zip(batch["instruction"], batch["input"],
                                                         batch["hyper_input_ids"], batch["input_ids"], batch["id"]):
            if instruction:  # a file row: text, formatted and tokenised as the model expects
                try:
                    keys.append(self.predictor.reader.task_key(instruction))
                except UserError as e:
                    raise UserError(f"row {row_id}: {e}") from None
                input_ids.append(self.predictor.reader.input_ids(instruction, text))
            else:  # a data-spec row: tokenised by the pipeline in the spec's format
                keys.append(tuple(int(t) for t in hyper))
                input_ids.append([int(t) for t in ids])
        misses = self.predictor.cache.stats.misses
        predictions = self.predictor.predict_tokens(keys, input_ids)
        part, rows = batch_output.write_part(self.parts_dir, {
            "id": [str(x) for x in batch["id"]], "task": [str(x) for x in batch["task"]],
            "input": [str(x) for x in batch["input"]], "prediction": predictions,
            "references": [[str(r) for r in refs] for refs in batch["references"]]})
        return {"part": [part], "rows": [rows],
                "task_states_generated": [self.predictor.cache.stats.misses - misses]}


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


def check_rows(table: pa.Table, export_dir: Path, max_input_len: int) -> None:
    """On the driver, before any model work: every file row's instruction is well-formed, not
    empty and fits the model's max_hyper_len, tokenised as the actors will (RequestReader: the
    model's format, without loading its weights). Data-spec rows were checked by their pipeline."""
    reader = RequestReader.of_export(export_dir, max_input_len)
    checked: set[str] = set()
    for row_id, instruction in zip(table.column("id").to_pylist(), table.column("instruction").to_pylist()):
        if not instruction or instruction in checked:  # a data-spec row, or an instruction seen
            continue
        try:
            reader.task_key(instruction)
        except BadRequest as e:
            raise UserError(f"row {row_id}: {e}") from None
        checked.add(instruction)


def predict(opts: PredictOptions, *, log_run: bool = True,
            progress: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the job on the current Ray, or resumes it; returns a summary (paths, metrics, run
    id). With `log_run` and a tracking URI, the job is an MLflow run (parameters, metrics, files)."""
    start = time.perf_counter()
    export_dir = resolve_export(opts.model, opts.tracking_uri)
    table = read_rows(opts.sources, export_dir, opts.max_input_len)
    check_rows(table, export_dir, opts.max_input_len)
    ids = table.column("id").to_pylist()
    twice = [i for i, n in Counter(ids).items() if n > 1]
    if twice:  # a rerun resumes by id: each must name one row
        raise UserError(f"sources {', '.join(opts.sources)}: row id {twice[0]!r} appears more than once")
    out = Path(opts.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    job = batch_output.fingerprint(opts.job(table))
    finished = batch_output.finished(out, job)
    if finished is not None:
        progress(f"{out}: this job finished before ({finished['rows']} rows); nothing to do")
        return finished
    work = batch_output.work_dir(out, job)
    work.mkdir(exist_ok=True)
    done = batch_output.written_ids(work) & set(ids)
    todo = table.filter(pc.invert(pc.is_in(table.column("id"), pa.array(sorted(done), pa.string()))))
    tasks = len(set(table.column("task").to_pylist()))
    generated = 0
    if done:
        progress(f"resuming: {len(done)} of {table.num_rows} rows were predicted before ({work})")
    if todo.num_rows:
        generated = _run_actors(opts, todo, work, progress)
    scored = batch_output.publish(work, out, set(ids))
    summary: dict[str, Any] = {
        "rows": table.num_rows, "tasks": tasks, "resumed_rows": len(done),
        "task_states_generated": generated, "seconds": round(time.perf_counter() - start, 2),
        "predictions": str(out / batch_output.PREDICTIONS), "job": job}
    files = [out / batch_output.PREDICTIONS]
    if scored:
        report = score_predictions(scored)
        summary["metrics"] = {"overall": report.overall, "per_task": report.per_task}
        batch_output.write_json(out / "metrics.json", summary["metrics"])
        files.append(out / "metrics.json")
    else:
        (out / "metrics.json").unlink(missing_ok=True)  # an earlier job's, about other predictions
    if log_run and opts.tracking_uri:
        summary["mlflow_run_id"] = _log(opts, summary, files)
    batch_output.write_json(out / batch_output.SUMMARY, summary)
    batch_output.remove(work)
    return summary


def _run_actors(opts: PredictOptions, todo: pa.Table, work: Path, progress: Callable[[str], None]) -> int:
    """Predicts `todo` over the actor pool, each batch written as a part into `work`; returns
    the task states generated."""
    cluster = ray.cluster_resources()
    resources = model_process_resources(cluster, cpus=opts.actor_cpus)
    concurrency = model_process_count(cluster, resources, opts.concurrency, todo.num_rows)
    share = "1 GPU" if "num_gpus" in resources else f"{opts.actor_cpus} CPU"
    progress(f"predicting {todo.num_rows} rows with {concurrency} actor(s) ({share} each, "
             f"at most {opts.max_restarts} restart(s) each)")
    kwargs = dict(cache_mib=opts.cache_mib, max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams,
                  batch_size=opts.batch_size, max_input_len=opts.max_input_len, dtype=opts.dtype)
    # Sorted by task: an actor's batches hold few tasks, and its cache keeps each one's state.
    # Ray Data's actors default to infinite restarts and retries: both set explicitly (Ray 2.60
    # has no named parameter for them; its extra keyword arguments are the actor's options).
    ds = ray.data.from_arrow(todo).sort("task").map_batches(
        PredictActor, fn_constructor_args=(opts.model, opts.tracking_uri, kwargs, str(work)),
        batch_size=opts.batch_size * 4, concurrency=concurrency, batch_format="numpy", **resources,
        max_restarts=opts.max_restarts, max_task_retries=opts.max_task_retries)
    generated = 0
    for written in ds.iter_rows():  # one small row per part: the predictions stay in storage
        generated += int(written["task_states_generated"])
    return generated


def _log(opts: PredictOptions, summary: dict[str, Any], files: list[Path]) -> str:
    """This job's MLflow run: its redacted parameters, its metrics and only its own files."""
    with experiment_run(opts.tracking_uri, opts.experiment, "predict") as run:
        params = {k: v for k, v in asdict(opts).items() if k not in ("params", "tracking_uri")}
        params["sources"] = " ".join(opts.sources)[:6000]
        mlflow.log_params(redact({**params, **opts.params}, env_secrets(os.environ)))
        flat = {k: v for k, v in summary.items() if isinstance(v, (int, float))}
        metrics = summary.get("metrics", {})
        flat.update({f"predict/{k}": v for k, v in metrics.get("overall", {}).items()})
        for task, values in metrics.get("per_task", {}).items():
            safe = "".join(c if c.isalnum() or c in "_-." else "_" for c in task)
            flat.update({f"predict/task/{safe}/{k}": v for k, v in values.items()})
        mlflow.log_metrics(flat)
        for path in files:
            mlflow.log_artifact(str(path), artifact_path="predict")
    return run.info.run_id
