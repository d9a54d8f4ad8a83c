"""Running a table's chain of stages: locally, through the platform's own training (`fit`) and
evaluation (`evaluate_export`), or as one Ray job on a cluster that runs the same thing there.

Resuming. A stage whose MLflow run FINISHED and whose export exists is skipped; any other
stage runs `fit`, which resumes a run of the same name and storage path from its latest
checkpoint. An evaluation whose MLflow run (tagged with the stage and the storage path)
FINISHED is skipped too. So `hint paper run TABLE` after an interruption picks up where it was.

MLflow tags, what `hint paper table` finds the cells by: `hint.paper.stage` (the run name),
`hint.storage_path`, `hint.paper.kind` (`eval` or `lengths`) and `hint.paper.export`.
"""

from __future__ import annotations

import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
from mlflow.tracking import MlflowClient

from hint_platform import export
from hint_platform.errors import UserError
from hint_platform.evaluation import evaluate
from hint_platform.evaluation.workers import EvalWorkers
from hint_platform.jobs import submit
from hint_platform.paper.plan import Table
from hint_platform.paper.stages import Resolved, lm_adapted, resolve
from hint_platform.tracking import runs
from hint_platform.training.driver import fit, start_ray
from pipelines import SourceSpec, prepare

STAGE_TAG = "hint.paper.stage"
KIND_TAG = "hint.paper.kind"
EXPORT_TAG = "hint.paper.export"


@dataclass
class StageOutcome:
    name: str
    action: str  # trained | skipped | evaluated | measured
    export_dir: str | None = None
    run_id: str | None = None


def plan_for(table: Table, size: str, overrides: list[str], checkpoint: str | None = None,
             shared_dir: str | None = None) -> list[Resolved]:
    """Every stage of `table` at `size`, resolved, in running order."""
    if size not in table.sizes:
        raise UserError(f"{table.key}: the paper ran it at {', '.join(table.sizes)} only, not {size}")
    return [resolve(s, size, overrides, checkpoint=checkpoint, shared_dir=shared_dir)
            for s in table.stages()]


def run_local(table: Table, size: str, overrides: list[str], *, checkpoint: str | None = None,
              shared_dir: str | None = None, workers: EvalWorkers | None = None,
              progress: Callable[[str], None] = print) -> list[StageOutcome]:
    """Trains, evaluates (or measures) every stage of `table` that has not finished."""
    if table.kind == "flops":
        progress(f"{table.key}: nothing to run (computed by `hint paper table {table.key}` from "
                 "Table 7's medians)")
        return []
    evaluated = {s.name for s in table.evaluated()}
    outcomes = []
    for stage in plan_for(table, size, overrides, checkpoint, shared_dir):
        if table.kind == "lengths":
            if stage.stage.name in evaluated:  # the chain's vocabulary: the LM-adapted T5's
                tokenizer = lm_adapted(size, overrides, checkpoint)
                outcomes.append(measure_lengths(stage, tokenizer, progress))
            continue
        outcomes.append(train(stage, progress))
        if stage.stage.name in evaluated:
            outcomes.append(evaluate_stage(stage, progress, workers))
    return outcomes


def train(stage: Resolved, progress: Callable[[str], None]) -> StageOutcome:
    cfg = stage.cfg
    export_dir = runs.storage_dir(cfg) / cfg.name / "export"
    run = tagged_run(cfg, {runs.RUN_NAME_TAG: cfg.name})
    if run is not None and run.info.status == "FINISHED" and export.is_export(export_dir):
        progress(f"[{cfg.name}] finished before: {export_dir}")
        return StageOutcome(cfg.name, "skipped", str(export_dir), run.info.run_id)
    progress(f"[{cfg.name}] training: {shlex.join(stage.command())}")
    result = fit(cfg)
    progress(f"[{cfg.name}] {result.steps_done} steps, export {result.export_dir}")
    return StageOutcome(cfg.name, "trained", result.export_dir, result.mlflow_run_id)


def evaluate_stage(stage: Resolved, progress: Callable[[str], None],
                   workers: EvalWorkers | None = None) -> StageOutcome:
    """`hint eval` of the stage's export on its config's eval sources, logged with the tags a
    table finds it by."""
    cfg = stage.cfg
    export_dir = runs.storage_dir(cfg) / cfg.name / "export"
    tags = paper_tags(stage, "eval")
    done = tagged_run(cfg, tags)
    if done is not None and done.info.status == "FINISHED":
        progress(f"[{cfg.name}] evaluated before: MLflow run {done.info.run_id}")
        return StageOutcome(cfg.name, "skipped", str(export_dir), done.info.run_id)
    progress(f"[{cfg.name}] evaluating on {len(cfg.data.eval)} source(s)")
    if not ray.is_initialized():  # the stage's training ran before: start Ray for its evaluation
        start_ray()
    # Ray workers, one per GPU of the cluster (workers.py): this process only coordinates.
    report = evaluate.evaluate_export(export_dir, cfg, max_new_tokens=cfg.data.max_target_len,
                                      workers=workers, progress=progress)
    out = evaluate.save_report(report, runs.storage_dir(cfg) / "eval" / cfg.name)
    uri = runs.resolve_tracking_uri(cfg)
    run_id = evaluate.log_report(report, out, tracking_uri=uri, experiment=cfg.run.experiment,
                                 run_name=f"eval-{cfg.name}", tags=tags,
                                 artifact_location=runs.artifact_location(cfg, uri))
    progress(f"[{cfg.name}] " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(report.overall.items())))
    return StageOutcome(cfg.name, "evaluated", str(export_dir), run_id)


def measure_lengths(stage: Resolved, tokenizer: str, progress: Callable[[str], None]) -> StageOutcome:
    """Table 7: the stage's training data through `pipelines.prepare`; its manifest's medians
    logged as metrics (`median_instruction`, `median_input`, `median_output`)."""
    cfg = stage.cfg
    tags = paper_tags(stage, "lengths")
    done = tagged_run(cfg, tags)
    if done is not None and done.info.status == "FINISHED":
        progress(f"[{cfg.name}] measured before: MLflow run {done.info.run_id}")
        return StageOutcome(cfg.name, "skipped", run_id=done.info.run_id)
    out = runs.storage_dir(cfg) / "data" / f"{cfg.name}-train"
    d = cfg.data
    specs = [SourceSpec.from_dict(s, where=f"data.train[{i}]") for i, s in enumerate(d.train)]
    manifest = prepare(specs, str(export.tokenizer_dir(tokenizer)), str(out),
                       max_input_len=d.max_input_len, max_hyper_len=d.max_hyper_len,
                       max_target_len=d.max_target_len, on_bad_record=d.on_bad_record,
                       seed=d.seed, progress=False)
    uri = runs.resolve_tracking_uri(cfg)
    with runs.experiment_run(uri, cfg.run.experiment, f"lengths-{cfg.name}", tags=tags,
                             artifact_location=runs.artifact_location(cfg, uri)) as run:
        mlflow.log_metrics({f"median_{k}": float(v) for k, v in manifest["medians"].items()}
                           | {"num_examples": float(manifest["num_examples"])})
        mlflow.log_artifact(str(Path(out) / "manifest.json"), artifact_path="data")
    progress(f"[{cfg.name}] medians {manifest['medians']} over {manifest['num_examples']} examples")
    return StageOutcome(cfg.name, "measured", run_id=run.info.run_id)


def paper_tags(stage: Resolved, kind: str) -> dict[str, str]:
    cfg = stage.cfg
    return {STAGE_TAG: cfg.name, runs.STORAGE_TAG: str(runs.storage_dir(cfg)), KIND_TAG: kind,
            EXPORT_TAG: str(runs.storage_dir(cfg) / cfg.name / "export")}


def tagged_run(cfg, tags: dict[str, str]):
    """The newest MLflow run of `cfg`'s experiment and storage path with these tags, or None."""
    uri = runs.resolve_tracking_uri(cfg)
    runs.check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.run.experiment)
    if experiment is None:
        return None
    wanted = {**{k: v for k, v in tags.items() if k != EXPORT_TAG},
              runs.STORAGE_TAG: str(runs.storage_dir(cfg))}
    where = " and ".join(f"tags.`{k}` = '{v}'" for k, v in wanted.items())
    found = client.search_runs([experiment.experiment_id], filter_string=where,
                               order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def stage_gpus(stages: list[Resolved], evaluated: set[str], workers: EvalWorkers) -> dict[str, str]:
    """The GPUs each stage asks the cluster for: its training's workers (`train.num_workers`
    with `train.use_gpu`), and its evaluation's (`workers`: one per GPU of the cluster unless
    set). The job's driver itself holds none: it only coordinates."""
    needs = {}
    for stage in stages:
        t = stage.cfg.train
        needs[stage.name] = f"train {t.num_workers if t.use_gpu else 0}"
        if stage.stage.name in evaluated:
            per = 1.0 if workers.gpus is None else workers.gpus
            count = "every GPU" if workers.count is None else f"{workers.count * per:g}"
            needs[stage.name] += f", eval {count} ({per:g} per worker)"
    return needs


def paper_job(table: Table, size: str, overrides: list[str], *, shared_dir: str | None,
              checkpoint: str | None, tracking_uri: str | None, working_dir: str = ".",
              workers: EvalWorkers | None = None) -> submit.JobRequest:
    """The Ray job that runs this `hint paper run` on a cluster, checked here first: every
    stage's config validates and reads and writes only shared storage. The evaluation workers'
    GPUs travel as options; the GPUs of every stage are in the job's metadata."""
    workers = workers or EvalWorkers()
    stages = plan_for(table, size, overrides, checkpoint, shared_dir)
    unshared = [(s.name, key, path) for s in stages for key, path in submit.unshared_paths(s.cfg)]
    if unshared:
        raise UserError("a paper run on a cluster reads and writes only shared storage; not shared: "
                        + "; ".join(f"{name}: {key}={path!r}" for name, key, path in unshared[:5])
                        + ". Pass --shared-dir DIR, or override them")
    argv = ["paper", "run", table.key, "--size", size, *overrides]
    argv += [f"--row={row.label}" for row in table.rows]
    argv += [f"--shared-dir={shared_dir}"] if shared_dir else []
    argv += [f"--checkpoint={checkpoint}"] if checkpoint else []
    argv += [f"--eval-workers={workers.count}"] if workers.count is not None else []
    argv += [f"--eval-gpus={workers.gpus:g}"] if workers.gpus is not None else []
    request = submit.command_request(argv, working_dir=working_dir, tracking_uri=tracking_uri,
                                     run_name=f"paper-{table.key}-{size}",
                                     login=runs.login_from_environment())
    evaluated = {s.name for s in table.evaluated()}
    request.metadata["hint_stage_gpus"] = "; ".join(
        f"{name}: {need}" for name, need in stage_gpus(stages, evaluated, workers).items())
    return request


def submit_table(request: submit.JobRequest, address: str | None, wait: bool = True) -> int:
    """Submits `paper_job`'s request; with `wait`, streams its logs and returns 0 only if it
    SUCCEEDED."""
    client = submit.connect(address)
    job_id = submit.submit(client, request)
    print(f"submitted {job_id}: {request.entrypoint}")
    if not wait:
        print(f"follow it with: hint jobs logs --follow {job_id} --address {client.get_address()}")
        return 0
    status = submit.follow(client, job_id)
    print(f"job {job_id} {status}")
    return 0 if status == "SUCCEEDED" else 1
