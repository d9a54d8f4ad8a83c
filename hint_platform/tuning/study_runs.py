"""A study in MLflow: one parent run per study and one child run per trial, in the base
config's experiment. Each is found again by name and storage path (tracking/runs.py), so a
resumed study or trial reopens its run instead of starting a second one. The training's rank 0
logs into the child; this module keeps the bookkeeping around it (tags, outcomes, the best).
"""

from __future__ import annotations

from mlflow.entities import Param

from hint_platform.config import ExperimentConfig, flatten, model_config
from hint_platform.tracking import runs
from hint_platform.tuning.plan import OPTIONS, StudyRun

TIME_ATTR = "step"  # ASHA's clock: every training report carries the optimizer step
STUDY_TAG = "hint.tune.study"
TRIAL_TAG = "hint.tune.trial_id"
POINT_TAG = "hint.tune.setting"  # the trial's point of the space, `key=value ...`
OUTCOME_TAG = "hint.tune.outcome"  # done | stopped early | failed
BEST_TAG = "hint.tune.best"  # "true" on the best trial; the parent's `..._trial` names it
PARENT_TAG = "mlflow.parentRunId"  # MLflow's own tag: the UI nests the child under the parent
ENDED = ("TERMINATED", "ERROR")  # Tune trial statuses that will not run again
_RUN_STATUS = {"done": "FINISHED", "stopped early": "KILLED", "failed": "FAILED"}  # MLflow's


def open_parent_run(run: StudyRun) -> str:
    """Creates the study's parent run, or reopens it when the study resumes. The study's
    options are logged once, when it starts: a resumed study keeps them (so does Tune)."""
    run_id = runs.open_run(run.base.with_overrides({"name": run.name}), run.tracking_uri)
    with runs.mlflow_client(run.tracking_uri) as client:
        client.set_tag(run_id, STUDY_TAG, run.study.name)
        client.set_tag(run_id, "mlflow.note.content", run.study.question)
        client.set_tag(run_id, "hint.tune.dir", str(run.path))
        logged = client.get_run(run_id).data.params
        values = {"metric": run.study.metric, "mode": run.study.mode, "space": repr(run.study.space)}
        values.update({key: run.option(key) for key in OPTIONS})
        for key, value in values.items():
            if f"tune.{key}" not in logged:
                client.log_param(run_id, f"tune.{key}", str(value)[:runs.MAX_PARAM_CHARS])
    return run_id


def logged_num_samples(run: StudyRun, parent_id: str) -> int:
    """The num_samples the study started with (a resumed study keeps it)."""
    with runs.mlflow_client(run.tracking_uri) as client:
        return int(client.get_run(parent_id).data.params["tune.num_samples"])


def open_child_run(cfg: ExperimentConfig, parent_id: str, trial_id: str, point: str) -> str:
    """The trial's run (reopened on a restart), nested under the parent. Besides the config it
    logs the resolved model config as `model.config.<field>`: every trial has the same param
    names, so MLflow's compare view lines up e.g. adapter_size whoever set it."""
    uri = cfg.run.tracking_uri
    run_id = runs.open_run(cfg, uri)
    with runs.mlflow_client(uri) as client:
        client.set_tag(run_id, PARENT_TAG, parent_id)
        client.set_tag(run_id, TRIAL_TAG, trial_id)
        client.set_tag(run_id, POINT_TAG, point)
        logged = client.get_run(run_id).data.params
        client.log_batch(run_id, params=[
            Param(f"model.config.{k}", str(v)) for k, v in model_config(cfg).to_dict().items()
            if f"model.config.{k}" not in logged])
    return run_id


def parent_run_id(run: StudyRun) -> str | None:
    """The study's MLflow parent run, if the study has started."""
    runs.check_reachable(run.tracking_uri)
    with runs.mlflow_client(run.tracking_uri) as client:
        experiment = client.get_experiment_by_name(run.base.run.experiment)
        if experiment is None:
            return None
        found = client.search_runs(
            [experiment.experiment_id],
            filter_string=f"tags.`{runs.RUN_NAME_TAG}` = '{run.name}' and "
                          f"tags.`{runs.STORAGE_TAG}` = '{runs.storage_dir(run.base)}'",
            max_results=1)
    return found[0].info.run_id if found else None


def child_runs(run: StudyRun, parent_id: str) -> list:
    """The study's trial runs in MLflow, oldest first."""
    with runs.mlflow_client(run.tracking_uri) as client:
        experiment = client.get_experiment_by_name(run.base.run.experiment)
        return client.search_runs([experiment.experiment_id],
                                  filter_string=f"tags.`{PARENT_TAG}` = '{parent_id}'",
                                  order_by=["attributes.start_time ASC"])


def close_child_runs(run: StudyRun, parent_id: str, trials) -> None:
    """Closes each ended trial's MLflow run with how the trial ended, and tags it. A trial that
    ASHA stopped was killed mid-training: its run may be left running, or marked failed by the
    interrupted training."""
    with runs.mlflow_client(run.tracking_uri) as client:
        by_trial = {r.data.tags.get(TRIAL_TAG): r for r in child_runs(run, parent_id)}
        for t in trials:
            child = by_trial.get(t.trial_id)
            if child is None or t.status not in ENDED:
                continue
            outcome = trial_outcome(t, run.base.train.max_steps)
            client.set_tag(child.info.run_id, OUTCOME_TAG, outcome)
            runs.set_terminated(run.tracking_uri, child.info.run_id, _RUN_STATUS[outcome])


def mark_best(run: StudyRun, parent_id: str, best_trial_id: str | None, metric: str,
              value: float | None) -> None:
    """Tags the best trial's child (and only it) and names it on the parent."""
    with runs.mlflow_client(run.tracking_uri) as client:
        for child in child_runs(run, parent_id):
            is_best = best_trial_id is not None and child.data.tags.get(TRIAL_TAG) == best_trial_id
            client.set_tag(child.info.run_id, BEST_TAG, str(is_best).lower())
        if best_trial_id is not None:
            client.set_tag(parent_id, f"{BEST_TAG}_trial", best_trial_id)
            client.log_metric(parent_id, f"best_{metric}", value)


def best_trial_id(run: StudyRun) -> str | None:
    """The trial the study's report named best (mark_best), or None."""
    parent = parent_run_id(run)
    if parent is None:
        return None
    with runs.mlflow_client(run.tracking_uri) as client:
        return client.get_run(parent).data.tags.get(f"{BEST_TAG}_trial")


def close_parent_run(run: StudyRun, parent_id: str, finished: bool) -> None:
    runs.set_terminated(run.tracking_uri, parent_id, "FINISHED" if finished else "KILLED")


def trial_outcome(t, max_steps: int) -> str:
    """How Tune trial `t` ended: done | stopped early (by ASHA) | failed; else its status
    (pending | running | paused). `max_steps` is the base config's; a study that sweeps
    `train.max_steps` (the epochs) gives each trial its own."""
    if t.status == "TERMINATED":
        own = flatten(t.config).get("train.max_steps", max_steps)
        return "done" if t.last_result.get(TIME_ATTR, 0) >= own else "stopped early"
    return "failed" if t.status == "ERROR" else t.status.lower()
