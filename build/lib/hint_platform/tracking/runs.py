"""MLflow tracking: where runs go, and what a training run logs there.

The driver resolves the tracking URI, checks that it answers (before any worker starts), and
creates or reopens the run; rank 0 of the workers then logs metrics, system metrics and
artifacts into that run by id. A run restarted under the same name and storage path continues
its MLflow run, so one training run is one MLflow run however often it resumed.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from hint_platform.config import ExperimentConfig
from hint_platform.errors import UserError

RUN_NAME_TAG = "hint.run_name"
STORAGE_TAG = "hint.storage_path"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
STEP_METRIC = "step"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"


class TrackingError(UserError):
    """The tracking store cannot be used: the message names the URI."""


def storage_dir(cfg: ExperimentConfig) -> Path:
    """The run directory, absolute (Ray Train needs an absolute storage path)."""
    return Path(cfg.run.storage_path).expanduser().resolve()


def resolve_tracking_uri(cfg: ExperimentConfig) -> str:
    """cfg.run.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite under the run directory."""
    if cfg.run.tracking_uri:
        return cfg.run.tracking_uri
    if os.environ.get(TRACKING_URI_ENV):
        return os.environ[TRACKING_URI_ENV]
    return f"sqlite:///{storage_dir(cfg) / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fails fast, naming `uri`, when the tracking store cannot be reached or created.

    MLflow's own client retries an unreachable server for minutes; a plain request with a short
    timeout says the same thing before any cluster time is spent.
    """
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout_s) as r:
                if r.status != 200:
                    raise TrackingError(f"MLflow tracking server {uri} answered {r.status} on /health")
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise TrackingError(f"MLflow tracking server {uri} is unreachable: {reason}") from None
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"MLflow store {uri}: cannot create {db.parent}: {e}") from None
    elif "://" in uri and not uri.startswith(("file://", "databricks")):
        raise TrackingError(f"MLflow tracking URI {uri}: unsupported scheme "
                            "(use http(s)://, sqlite:///, file:// or databricks)")


def artifact_location(cfg: ExperimentConfig, uri: str) -> str | None:
    """Local stores keep artifacts beside the run directory; a server decides for itself.

    Set explicitly because an experiment first created inside a Ray worker would otherwise get
    an artifact location under Ray's temporary directory.
    """
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return (storage_dir(cfg) / "mlartifacts" / cfg.run.experiment).as_uri()


def open_run(cfg: ExperimentConfig, uri: str) -> str:
    """Creates the MLflow run of `cfg` (or reopens the one a run of the same name and storage
    path started) and logs the whole resolved config as params. Returns the run id."""
    check_reachable(uri)
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(cfg.run.experiment)
    experiment_id = (experiment.experiment_id if experiment else
                     client.create_experiment(cfg.run.experiment,
                                              artifact_location=artifact_location(cfg, uri)))
    storage = str(storage_dir(cfg))
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.name}' and tags.`{STORAGE_TAG}` = '{storage}'",
        max_results=1,
    )
    if found:
        run = found[0]
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        run = client.create_run(experiment_id, run_name=cfg.name,
                                tags={RUN_NAME_TAG: cfg.name, STORAGE_TAG: storage})
    logged = run.data.params if found else {}
    # A resumed run keeps the params it started with (MLflow refuses to change a param); a
    # changed value, e.g. a longer train.max_steps, is recorded as a tag instead.
    for key, value in _param_values(cfg).items():
        if key not in logged:
            client.log_param(run.info.run_id, key, value)
        elif logged[key] != value:
            client.set_tag(run.info.run_id, f"hint.resumed_with.{key}", value)
    client.log_text(run.info.run_id, json.dumps(cfg.to_dict(), indent=2), "config.json")
    return run.info.run_id


@contextmanager
def tracking_uri_scope(uri: str | None) -> Iterator[None]:
    """`mlflow.set_tracking_uri(uri)` for one block (nothing when uri is None). MLflow's setter
    also writes $MLFLOW_TRACKING_URI, which resolve_tracking_uri reads: unscoped, one call would
    send every later run of this process to that store."""
    if uri is None:
        yield
        return
    saved = os.environ.get(TRACKING_URI_ENV)
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved)  # None unsets the variable again


def close_run(uri: str, run_id: str, ok: bool) -> None:
    MlflowClient(tracking_uri=uri).set_terminated(run_id, "FINISHED" if ok else "FAILED")


def _param_values(cfg: ExperimentConfig) -> dict[str, str]:
    out = {}
    for key, value in cfg.flat().items():
        text = value if isinstance(value, str) else json.dumps(value)
        out[key] = text if len(text) <= MAX_PARAM_CHARS else text[:MAX_PARAM_CHARS - 3] + "..."
    return out


class RunLogger:
    """Rank 0's handle on the MLflow run: metrics, system metrics, artifacts. On other ranks
    (`active=False`) every method does nothing, so the train loop calls it unconditionally.

    A worker group restarted after a failure redoes the steps after the last checkpoint; their
    metrics are logged once, by the first attempt (MLflow would keep both points of a step). The
    last step logged is the latest value of the `step` metric, which every log call writes.
    """

    def __init__(self, uri: str | None, run_id: str | None, active: bool):
        self.active = bool(active and uri and run_id)
        if not self.active:
            return
        mlflow.set_tracking_uri(uri)
        mlflow.set_system_metrics_sampling_interval(1)
        mlflow.set_system_metrics_samples_before_logging(1)
        self._mlflow = mlflow
        self._run = mlflow.start_run(run_id=run_id, log_system_metrics=True)
        self.last_step = int(self._run.data.metrics.get(STEP_METRIC, 0))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Logs `metrics` at `step`, unless a step this far was logged already."""
        if self.active and step > self.last_step:
            values = {k: float(v) for k, v in metrics.items()} | {STEP_METRIC: float(step)}
            self._mlflow.log_metrics(values, step=step)
            self.last_step = step

    def log_artifacts(self, local_dir: str | Path, artifact_path: str) -> None:
        if self.active:
            self._mlflow.log_artifacts(str(local_dir), artifact_path)

    def close(self) -> None:
        """Ends the run (and its system-metrics sampling) as finished."""
        if self.active:
            self._mlflow.end_run()
            self.active = False

