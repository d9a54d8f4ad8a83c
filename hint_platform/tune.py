"""Ray Tune studies over the platform's training run (`hint tune STUDY`).

A study (tune_spaces/) is a search space over experiment-config keys. Each Tune trial applies
its point of the space to the base config and runs the platform's training (`train.fit`, a Ray
Train `TorchTrainer`) with `TuneReportCallback` in the Train run config, so every training
report reaches Tune and ASHA can stop the trial (the Train V2 pattern, ../shared/STACK.md).

Where things go, for a base config named NAME:
  <run.storage_path>/tune/NAME-STUDY/            Tune's results, TensorBoard event files, report/
  <run.storage_path>/tune/NAME-STUDY/train/      each trial's training run (checkpoints, export)
MLflow: one parent run per study and one child run per trial, in `run.experiment`. Each is
found again by name and storage path (hint_platform.tracking), so a resumed study or trial
reopens its run instead of starting a second one. The training's rank 0 logs into the child.

An interrupted study (Ctrl-C, a lost driver) resumes when the same command runs again: Tune
restores its state, finished trials are kept, unfinished ones start again and their training
resumes from its last checkpoint.
"""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from hint_platform import tracking
from hint_platform.config import ConfigError, ExperimentConfig, from_dict, load
from tune_spaces import Study, load_study

REPO = Path(__file__).resolve().parent.parent
TIME_ATTR = "step"  # ASHA's clock: every training report carries the optimizer step
STUDY_TAG = "hint.tune.study"
TRIAL_TAG = "hint.tune.trial_id"
SETTING_TAG = "hint.tune.setting"  # the trial's point of the space, `key=value ...`
OUTCOME_TAG = "hint.tune.outcome"  # done | stopped early | failed
BEST_TAG = "hint.tune.best"  # "true" on the best trial; the parent's `..._trial` names it
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the child under the parent
_ENDED = ("TERMINATED", "ERROR")  # Tune trial statuses that will not run again
_RUN_STATUS = {"done": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}  # MLflow's


@dataclass
class StudyRun:
    study: Study
    base: ExperimentConfig  # the base config with the command line's overrides
    settings: dict[str, Any]  # num_samples, max_concurrent, ... given on the command line

    @property
    def name(self) -> str:
        return f"{self.base.name}-{self.study.name}"

    @property
    def path(self) -> Path:
        """Tune's experiment directory."""
        return tracking.storage_dir(self.base) / "tune" / self.name

    @property
    def tracking_uri(self) -> str:
        return tracking.resolve_tracking_uri(self.base)

    def setting(self, key: str) -> Any:
        """The command line's value of a study setting, else the study's default."""
        value = self.settings.get(key)
        return getattr(self.study, key) if value is None else value


def prepare(study: str | Study, config_path: str | Path | None = None,
            overrides: list[str] | dict[str, Any] = (), **settings: Any) -> StudyRun:
    """Loads the study (a name in tune_spaces, or a Study) and its base config, and checks the
    settings and every point of the space against the config schema and the model's config, so
    that a bad key fails before any trial starts.

    `settings`: num_samples, max_concurrent, scheduler (asha | fifo), grace_period; None keeps
    the study's default.
    """
    study = load_study(study) if isinstance(study, str) else study
    path = Path(config_path) if config_path else REPO / study.base_config
    base = load(path, study.base_overrides)
    if overrides:
        base = base.with_overrides(overrides)
    run = StudyRun(study, base, settings)
    if run.setting("scheduler") not in ("asha", "fifo"):
        raise ConfigError(f"scheduler {run.setting('scheduler')!r} is not one of asha, fifo")
    if study.mode not in ("min", "max"):
        raise ConfigError(f"study {study.name}: mode {study.mode!r} is not one of min, max")
    for key in ("num_samples", "max_concurrent", "grace_period"):
        if run.setting(key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {run.setting(key)}")
    try:
        check_model(base)
    except ConfigError as e:
        raise ConfigError(f"base config {path}: {e}") from None
    for key, domain in study.space.items():
        for value in _candidates(domain):
            try:
                check_model(apply_point(base, {key: value}))
            except ConfigError as e:
                raise ConfigError(f"study {study.name}, search-space key {key}: {e}") from None
    # Keys valid one by one can still clash together (a decoder generator with generator_heads).
    keys = list(study.space)
    for values in itertools.product(*(_candidates(study.space[k]) for k in keys)):
        point = dict(zip(keys, values))
        try:
            check_model(apply_point(base, point))
        except ConfigError as e:
            raise ConfigError(f"study {study.name}, search-space point {point}: {e}") from None
    return run


def apply_point(base: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    """The config of one trial: `point` (dotted keys; a mapping value sets keys under its key)
    applied to `base`."""
    return base.with_overrides(dotted(point))


def check_model(cfg: ExperimentConfig) -> None:
    """The model section must build a HintConfig (its overrides are HintConfig fields)."""
    from hint_model import HintConfig

    m = cfg.model
    try:
        HintConfig.preset(m.preset, variant=m.variant, **m.overrides)
    except ValueError as e:
        raise ConfigError(f"model: {e}") from None


def fit_trial(cfg: ExperimentConfig) -> None:
    """What a trial runs by default: the platform's training, reporting to Tune."""
    from ray.tune.integration.ray_train import TuneReportCallback

    from hint_platform.train import fit

    fit(cfg, run_config_callbacks=[TuneReportCallback()])


def run_study(run: StudyRun, trial_fn: Callable[[ExperimentConfig], None] = fit_trial) -> bool:
    """Runs (or resumes) the study to the end, closes its MLflow runs and writes the report.

    `trial_fn(cfg)` runs one trial's training and reports metrics with `step` and the study's
    metric to Tune. Returns False when the study was interrupted (run it again to resume).
    """
    import ray
    from mlflow.tracking import MlflowClient
    from ray import tune
    from ray.tune import ExperimentAnalysis

    from hint_platform.tune_report import write_report

    uri = run.tracking_uri
    client = MlflowClient(uri)
    parent_id = _open_parent_run(run, client)
    # Training reports between evaluations carry no eval metric; ASHA skips those results,
    # and Tune must not reject them.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    if not ray.is_initialized():
        _start_ray(run)
    trainable = tune.with_parameters(
        trial, trial_fn=trial_fn, base=run.base.to_dict(), study_run=run.name,
        train_dir=str(run.path / "train"), tracking_uri=uri, parent_run_id=parent_id)
    # The trial itself only drives a TorchTrainer; its workers ask for their own CPUs/GPUs
    # (train.cpus_per_worker, train.use_gpu), so a trial needs next to nothing ({"CPU": 0} is
    # refused).
    trainable = tune.with_resources(trainable, {"CPU": 0.01})
    if tune.Tuner.can_restore(str(run.path)):
        print(f"resuming study {run.name} from {run.path} (its original settings apply)")
        tuner = tune.Tuner.restore(str(run.path), trainable, resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=run.study.space,
            tune_config=tune.TuneConfig(
                metric=run.study.metric, mode=run.study.mode, scheduler=_scheduler(run),
                num_samples=run.setting("num_samples"),
                max_concurrent_trials=run.setting("max_concurrent")),
            run_config=tune.RunConfig(name=run.name, storage_path=str(run.path.parent)),
        )
    tuner.fit()
    trials = ExperimentAnalysis(str(run.path)).trials
    _close_child_runs(run, parent_id, trials)
    write_report(run, parent_id)
    # Tune creates trials as slots free up: an interrupted study may lack some, so count them.
    expected = int(client.get_run(parent_id).data.params["tune.num_samples"]) * math.prod(
        len(d["grid_search"]) for d in run.study.space.values() if _is_grid(d))
    finished = len(trials) == expected and all(t.status in _ENDED for t in trials)
    tracking.set_terminated(uri, parent_id, "FINISHED" if finished else "KILLED")
    if not finished:
        print(f"study {run.name} interrupted: run the same command again to resume it")
    return finished


def parent_run_id(run: StudyRun) -> str | None:
    """The study's MLflow parent run, if the study has started."""
    from mlflow.tracking import MlflowClient

    tracking.check_reachable(run.tracking_uri)
    client = MlflowClient(run.tracking_uri)
    experiment = client.get_experiment_by_name(run.base.run.experiment)
    if experiment is None:
        return None
    found = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{tracking.RUN_NAME_TAG}` = '{run.name}' and "
                      f"tags.`{tracking.STORAGE_TAG}` = '{tracking.storage_dir(run.base)}'",
        max_results=1)
    return found[0].info.run_id if found else None


def child_runs(run: StudyRun, parent_id: str) -> list:
    """The study's trial runs in MLflow, oldest first."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.tracking_uri)
    experiment = client.get_experiment_by_name(run.base.run.experiment)
    return client.search_runs([experiment.experiment_id],
                              filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                              order_by=["attributes.start_time ASC"])


def trial(point: dict[str, Any], *, trial_fn, base: dict[str, Any], study_run: str,
          train_dir: str, tracking_uri: str, parent_run_id: str) -> None:
    """One Tune trial: its config, its MLflow child run (reopened on a restart), its training.

    The training run is named after the trial, so a restarted trial resumes its checkpoint and
    its MLflow run (tracking.open_run finds both by name and storage path). Besides the config,
    the child logs the resolved model config as `model.config.<field>`: every trial has the same
    param names, so MLflow's compare view lines up e.g. adapter_size whoever set it.
    """
    from mlflow.entities import Param
    from mlflow.tracking import MlflowClient
    from ray import tune

    from hint_model import HintConfig

    trial_id = tune.get_context().get_trial_id()
    cfg = apply_point(from_dict(base), point).with_overrides({
        "name": f"{study_run}-{trial_id}", "run.storage_path": train_dir,
        "run.tracking_uri": tracking_uri, "run.register_as": None})
    run_id = tracking.open_run(cfg, tracking_uri)
    client = MlflowClient(tracking_uri)
    client.set_tag(run_id, PARENT_TAG, parent_run_id)
    client.set_tag(run_id, TRIAL_TAG, trial_id)
    client.set_tag(run_id, SETTING_TAG, setting(point))
    m = cfg.model
    model = HintConfig.preset(m.preset, variant=m.variant, **m.overrides).to_dict()
    logged = client.get_run(run_id).data.params
    client.log_batch(run_id, params=[Param(f"model.config.{k}", str(v)) for k, v in model.items()
                                     if f"model.config.{k}" not in logged])
    trial_fn(cfg)


def _start_ray(run: StudyRun) -> None:
    """Joins the cluster in RAY_ADDRESS, else starts a local Ray with CPUs enough for
    `max_concurrent` trials at once: each needs its workers' CPUs plus one whole CPU for its Ray
    Data tasks, which otherwise wait forever (STACK.md). On a laptop these are logical CPUs."""
    from hint_platform.train import start_ray

    if os.environ.get("RAY_ADDRESS"):
        start_ray()
        return
    t = run.base.train
    per_trial = t.num_workers * t.cpus_per_worker + 1
    needed = math.ceil(run.setting("max_concurrent") * per_trial)
    start_ray(num_cpus=max(os.cpu_count() or 1, needed))


def _open_parent_run(run: StudyRun, client) -> str:
    """Creates the study's parent run, or reopens it when the study resumes. The study's
    settings are logged once, when it starts: a resumed study keeps them (so does Tune)."""
    run_id = tracking.open_run(run.base.with_overrides({"name": run.name}), run.tracking_uri)
    client.set_tag(run_id, STUDY_TAG, run.study.name)
    client.set_tag(run_id, "mlflow.note.content", run.study.question)
    client.set_tag(run_id, "hint.tune.dir", str(run.path))
    logged = client.get_run(run_id).data.params
    settings = {"metric": run.study.metric, "mode": run.study.mode, "space": repr(run.study.space)}
    settings.update({key: run.setting(key) for key in
                     ("num_samples", "max_concurrent", "scheduler", "grace_period")})
    for key, value in settings.items():
        if f"tune.{key}" not in logged:
            client.log_param(run_id, f"tune.{key}", str(value)[:tracking.MAX_PARAM_CHARS])
    return run_id


def _close_child_runs(run: StudyRun, parent_id: str, trials) -> None:
    """Closes each ended trial's MLflow run with how the trial ended, and tags it. A trial that
    ASHA stopped was killed mid-training: its run may be left running, or marked failed by the
    interrupted training."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(run.tracking_uri)
    by_trial = {r.data.tags.get(TRIAL_TAG): r for r in child_runs(run, parent_id)}
    for t in trials:
        child = by_trial.get(t.trial_id)
        if child is None or t.status not in _ENDED:
            continue
        outcome = trial_outcome(t, run.base.train.max_steps)
        client.set_tag(child.info.run_id, OUTCOME_TAG, outcome)
        tracking.set_terminated(run.tracking_uri, child.info.run_id, _RUN_STATUS[outcome])


def trial_outcome(t, max_steps: int) -> str:
    """How Tune trial `t` ended: done | stopped early (by ASHA) | failed; else its status
    (pending | running | paused)."""
    if t.status == "TERMINATED":
        return "done" if t.last_result.get(TIME_ATTR, 0) >= max_steps else "stopped early"
    return "failed" if t.status == "ERROR" else t.status.lower()


def _scheduler(run: StudyRun):
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if run.setting("scheduler") == "fifo":
        return FIFOScheduler()
    max_steps = run.base.train.max_steps  # a short base run (a laptop's) shortens the grace
    # stop_last_trials=False: a trial at max_steps finishes on its own (its export, its run).
    return ASHAScheduler(time_attr=TIME_ATTR, max_t=max_steps,
                         grace_period=min(run.setting("grace_period"), max_steps),
                         reduction_factor=run.study.reduction_factor, stop_last_trials=False)


def _candidates(domain: Any) -> list[Any]:
    """The values a search-space entry can take (one sample for a continuous domain)."""
    from ray.tune.search.sample import Categorical, Domain

    if _is_grid(domain):
        return list(domain["grid_search"])
    if isinstance(domain, Categorical):
        return list(domain.categories)
    if isinstance(domain, Domain):
        return [domain.sample()]
    return [domain]


def _is_grid(domain: Any) -> bool:
    return isinstance(domain, dict) and set(domain) == {"grid_search"}


def setting(point: dict[str, Any]) -> str:
    """A trial's point as a person reads it: `adapter_size=64 prefix_length=30`."""
    return " ".join(f"{k.removeprefix('model.overrides.').removeprefix('model.')}={v}"
                    for k, v in dotted(point).items())


def dotted(point: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in point.items():
        if isinstance(value, dict) and value:
            out.update(dotted(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
