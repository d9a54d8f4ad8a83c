"""Running a study (`hint tune STUDY`): Ray Tune over the platform's training run.

A study (tune_spaces/) is a search space over experiment-config keys (plan.py checks it). Each
Tune trial applies its point of the space to the base config and runs the platform's training
(`training.fit`, a Ray Train `TorchTrainer`) with `TuneReportCallback` in the Train run config,
so every training report reaches Tune and ASHA can stop the trial (the Train V2 pattern,
../shared/STACK.md). A trial that trains to the end is then evaluated as `hint eval` evaluates
(evaluation/evaluate.py on the config's data.eval sources, decoding up to the target length):
the paper's ablations compare held-out ROUGE-L, exact match or accuracy, not eval_loss. Its
overall figures reach Tune as `eval/rougeL`, ... (the leaderboard's columns), and all of them
(per task and category too) the trial's MLflow run.

Where things go, for a base config named NAME:
  <run.storage_path>/tune/NAME-STUDY/            Tune's results, TensorBoard event files, report/
  <run.storage_path>/tune/NAME-STUDY/train/      each trial's training run (checkpoints, export)
MLflow: study_runs.py (a parent run per study, a child per trial).

Paths: plan.py made the base config's absolute on the driver and checked every point; a
trial resolves its point's own paths (e.g. `model.init_from` in the pretraining study) against
the directory the study was started in, not Tune's trial directory it runs in. A study in which
every trial failed is an error that quotes the first trial's.

An interrupted study (Ctrl-C, a lost driver) resumes when the same command runs again: Tune
restores its state, finished trials are kept, unfinished ones start again and their training
resumes from its last checkpoint.
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Callable

import ray
from mlflow.entities import Metric
from ray import tune
from ray.tune import ExperimentAnalysis
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

from hint_platform.config import ExperimentConfig, from_dict
from hint_platform.errors import USER_ERRORS, TrainingError
from hint_platform.evaluation.evaluate import evaluate_export
from hint_platform.tracking import runs
from hint_platform.training.driver import fit, start_ray
from hint_platform.training.preflight import resolve
from hint_platform.tuning import study_runs
from hint_platform.tuning.plan import StudyRun, apply_point, point_label
from hint_platform.tuning.report import write_report


def fit_trial(cfg: ExperimentConfig) -> None:
    """What a trial runs by default: the platform's training, reporting to Tune, then the
    evaluation of its export on data.eval (when it has eval sources)."""
    result = fit(cfg, run_config_callbacks=[TuneReportCallback()])
    if not (cfg.data.eval and result.export_dir):
        return
    report = evaluate_export(result.export_dir, cfg, max_new_tokens=cfg.data.max_target_len)
    timestamp = int(time.time() * 1000)
    with runs.mlflow_client(result.tracking_uri) as client:
        client.log_batch(result.mlflow_run_id, metrics=[
            Metric(k, v, timestamp, result.steps_done) for k, v in report.flat_metrics().items()])
    tune.report({f"eval/{k}": v for k, v in report.overall.items()} | {"step": result.steps_done})


def run_study(run: StudyRun, trial_fn: Callable[[ExperimentConfig], None] = fit_trial) -> bool:
    """Runs (or resumes) the study to the end, closes its MLflow runs and writes the report.

    `trial_fn(cfg)` runs one trial's training and reports metrics with `step` and the study's
    metric to Tune. Returns False when the study was interrupted (run it again to resume);
    raises TrainingError, quoting the first trial's error, when every trial failed.
    """
    uri = run.tracking_uri
    parent_id = study_runs.open_parent_run(run)
    # Training reports between evaluations carry no eval metric; ASHA skips those results,
    # and Tune must not reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not ray.is_initialized():
        _start_ray(run)
    trainable = tune.with_parameters(
        trial, trial_fn=trial_fn, base=run.base.to_dict(), study_run=run.name,
        train_dir=str(run.path / "train"), tracking_uri=uri, parent_run_id=parent_id,
        workdir=run.workdir)
    # The trial itself only drives a TorchTrainer; its workers ask for their own CPUs/GPUs
    # (train.cpus_per_worker, train.use_gpu), so a trial needs next to nothing ({"CPU": 0} is
    # refused).
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    if tune.Tuner.can_restore(str(run.path)):
        print(f"resuming study {run.name} from {run.path} (its original options apply)")
        tuner = tune.Tuner.restore(str(run.path), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=run.study.space,
            tune_config=tune.TuneConfig(
                metric=run.study.metric, mode=run.study.mode, scheduler=_scheduler(run),
                num_samples=run.option("num_samples"),
                max_concurrent_trials=run.option("max_concurrent")),
            run_config=tune.RunConfig(name=run.name, storage_path=str(run.path.parent)),
        )
    results = tuner.fit()
    trials = ExperimentAnalysis(str(run.path)).trials
    study_runs.close_child_runs(run, parent_id, trials)
    write_report(run, parent_id)
    # Tune creates trials as slots free up: an interrupted study may lack some, so count them.
    expected = run.expected_trials(study_runs.logged_num_samples(run, parent_id))
    finished = len(trials) == expected and all(t.status in study_runs.ENDED for t in trials)
    study_runs.close_parent_run(run, parent_id, finished)
    if not finished:
        print(f"study {run.name} interrupted: run the same command again to resume it")
    errors = [r.error for r in results if r.error is not None]
    if finished and len(errors) == len(results):
        raise TrainingError(f"study {run.name}: all {len(errors)} trials failed (report: "
                            f"{run.path / 'report'}); the first: {one_line(errors[0])}")
    return finished


def one_line(error: BaseException) -> str:
    """A trial's error as one line: the platform's own message, else the innermost
    exception's type and first line (Tune wraps what the trial raised)."""
    while (inner := getattr(error, "cause", None) or error.__cause__) not in (None, error):
        error = inner
    if isinstance(error, USER_ERRORS):
        return str(error).splitlines()[0]
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"


def trial(point: dict[str, Any], *, trial_fn, base: dict[str, Any], study_run: str,
          train_dir: str, tracking_uri: str, parent_run_id: str, workdir: str) -> None:
    """One Tune trial: its config, its MLflow child run (reopened on a restart), its training.
    The training run is named after the trial, so a restarted trial resumes its checkpoint and
    its MLflow run."""
    trial_id = tune.get_context().get_trial_id()
    cfg = resolve(apply_point(from_dict(base), point), relative_to=workdir).with_overrides({
        "name": f"{study_run}-{trial_id}", "run.storage_path": train_dir,
        "run.tracking_uri": tracking_uri, "run.register_as": None})
    study_runs.open_child_run(cfg, parent_run_id, trial_id, point_label(point))
    trial_fn(cfg)


def _start_ray(run: StudyRun) -> None:
    """Joins the cluster in RAY_ADDRESS, else starts a local Ray with CPUs enough for
    `max_concurrent` trials at once: each needs its workers' CPUs plus one whole CPU for its Ray
    Data tasks, which otherwise wait forever (STACK.md). On a laptop these are logical CPUs."""
    if os.environ.get("RAY_ADDRESS"):
        start_ray()
        return
    t = run.base.train
    per_trial = t.num_workers * t.cpus_per_worker + 1
    needed = math.ceil(run.option("max_concurrent") * per_trial)
    start_ray(num_cpus=max(os.cpu_count() or 1, needed))


def _scheduler(run: StudyRun):
    if run.option("scheduler") == "fifo":
        return FIFOScheduler()
    max_steps = run.base.train.max_steps  # a short base run (a laptop's) shortens the grace
    # stop_last_trials=False: a trial at max_steps finishes on its own (its export, its run).
    return ASHAScheduler(time_attr=study_runs.TIME_ATTR, max_t=max_steps,
                         grace_period=min(run.option("grace_period"), max_steps),
                         reduction_factor=run.study.reduction_factor, stop_last_trials=False)
