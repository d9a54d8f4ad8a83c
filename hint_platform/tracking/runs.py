"""MLflow tracking: where runs go, and what a training run logs there.

The driver resolves the tracking URI, checks that it answers (before any worker starts), and
creates or reopens the run; rank 0 of the workers then logs metrics, system metrics and
artifacts into that run by id. A run restarted under the same name and storage path continues
its MLflow run, so one training run is one MLflow run however often it resumed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from hint_platform import storage
from hint_platform.config import ExperimentConfig
from hint_platform.errors import UserError
from hint_platform.redact import redact, split_credentials

RUN_NAME_TAG = "hint.run_name"
STORAGE_TAG = "hint.storage_path"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
STEP_METRIC = "step"
TRACKING_URI_ENV = "MLFLOW_TRACKING_URI"
# The variables MLflow's own client logs in with (basic auth, or a bearer token).
USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV = ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                                         "MLFLOW_TRACKING_TOKEN")
CREDENTIAL_ENVS = (USERNAME_ENV, PASSWORD_ENV, TOKEN_ENV)


_LOGIN_HELP = (f"set {USERNAME_ENV} and {PASSWORD_ENV} to your account on it "
               f"(or {TOKEN_ENV} to a token); infra/README.md says who creates accounts")


class TrackingError(UserError):
    """The tracking store cannot be used: the message names the URI (its password masked)."""


def storage_root(cfg: ExperimentConfig) -> str:
    """Where the runs go: an absolute local (or mounted) path, or an s3:// / gs:// URI (Ray
    Train's checkpoints and the export go there; hint_platform/storage.py)."""
    if storage.is_uri(cfg.run.storage_path):
        return storage.check_uri(cfg.run.storage_path, "run.storage_path")
    return str(Path(cfg.run.storage_path).expanduser().resolve())


def storage_dir(cfg: ExperimentConfig) -> Path:
    """The run directory, absolute, for the commands that keep their files on this machine's
    filesystem (a shared mount included): an object store URI is refused, before any work."""
    if storage.is_uri(cfg.run.storage_path):
        raise UserError(f"run.storage_path={cfg.run.storage_path}: this command keeps its files "
                        "in a local or mounted directory (only training writes its checkpoints "
                        "and export to an object store); set run.storage_path to such a path")
    return Path(storage_root(cfg))


def resolve_tracking_uri(cfg: ExperimentConfig) -> str:
    """cfg.run.tracking_uri, else $MLFLOW_TRACKING_URI, else SQLite under the run directory
    (a local one: SQLite cannot live in an object store)."""
    if cfg.run.tracking_uri:
        return cfg.run.tracking_uri
    if os.environ.get(TRACKING_URI_ENV):
        return os.environ[TRACKING_URI_ENV]
    if storage.is_uri(cfg.run.storage_path):
        raise TrackingError(f"run.storage_path={cfg.run.storage_path} is an object store, where "
                            "the default SQLite tracking store cannot live: set run.tracking_uri "
                            f"(or ${TRACKING_URI_ENV}) to a tracking server or a local sqlite:/// file")
    return f"sqlite:///{storage_dir(cfg) / 'mlflow.db'}"


def check_reachable(uri: str, timeout_s: float = 5.0) -> None:
    """Fails fast, naming `uri`, when the tracking store cannot be reached or created, or when
    a server refuses our login (MLflow's basic-auth app).

    MLflow's own client retries an unreachable server for minutes; a plain request with a short
    timeout says the same thing before any cluster time is spent.
    """
    if uri.startswith(("http://", "https://")):
        _check_server(uri, timeout_s)
    elif uri.startswith("sqlite:///"):
        db = Path(uri.removeprefix("sqlite:///"))
        try:
            db.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise TrackingError(f"MLflow store {uri}: cannot create {db.parent}: {e}") from None
    elif "://" in uri and not uri.startswith(("file://", "databricks")):
        raise TrackingError(f"MLflow tracking URI {uri}: unsupported scheme "
                            "(use http(s)://, sqlite:///, file:// or databricks)")


def login_env(uri: str) -> dict[str, str]:
    """The login to `uri` as the variables MLflow's client reads: this process's
    $MLFLOW_TRACKING_USERNAME/PASSWORD first, then $MLFLOW_TRACKING_TOKEN, then the URI's own
    user:password@ ({} when there is none)."""
    _, uri_user, uri_password = split_credentials(uri)
    if os.environ.get(USERNAME_ENV) and os.environ.get(PASSWORD_ENV):
        return {USERNAME_ENV: os.environ[USERNAME_ENV], PASSWORD_ENV: os.environ[PASSWORD_ENV]}
    if os.environ.get(TOKEN_ENV):
        return {TOKEN_ENV: os.environ[TOKEN_ENV]}
    if uri_user:
        return {USERNAME_ENV: uri_user, PASSWORD_ENV: uri_password or ""}
    return {}


def login(uri: str) -> tuple[dict, str | None]:
    """The requests arguments (auth or headers) MLflow's client would log in to `uri` with, and
    who that is for messages (no secret), in login_env's order."""
    env = login_env(uri)
    if TOKEN_ENV in env:
        return {"headers": {"Authorization": f"Bearer {env[TOKEN_ENV]}"}}, TOKEN_ENV
    if USERNAME_ENV not in env:
        return {}, None
    from_env = os.environ.get(USERNAME_ENV) and os.environ.get(PASSWORD_ENV)
    source = f"{USERNAME_ENV}, {PASSWORD_ENV}" if from_env else "of the tracking URI"
    return {"auth": (env[USERNAME_ENV], env[PASSWORD_ENV])}, f"user {env[USERNAME_ENV]!r} ({source})"


def use_login(env: dict[str, str]) -> None:
    """Logs this process in as `env` (login_env's variables) for every later MLflow call: a Ray
    worker of a run, which gets its driver's login by object reference, never in its config
    or runtime environment (both are shown by Ray's dashboard and APIs)."""
    for key in CREDENTIAL_ENVS:
        os.environ.pop(key, None)
    os.environ.update(env)


def _check_server(uri: str, timeout_s: float) -> None:
    base = split_credentials(uri)[0].rstrip("/")
    try:
        health = requests.get(f"{base}/health", timeout=timeout_s)
        if health.status_code != 200:
            raise TrackingError(f"MLflow tracking server {uri} answered {health.status_code} on /health")
        login_args, who = login(uri)
        reply = requests.get(f"{base}/api/2.0/mlflow/experiments/search",
                             params={"max_results": 1}, timeout=timeout_s, **login_args)
    except requests.RequestException as e:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable: {type(e).__name__}") from None
    if reply.status_code == 401:
        if who is None:
            raise TrackingError(f"MLflow tracking server {uri} requires a login: {_LOGIN_HELP}")
        raise TrackingError(f"MLflow tracking server {uri} refused the login of {who}: "
                            f"the credentials are wrong or expired; {_LOGIN_HELP}")
    if reply.status_code == 403:
        raise TrackingError(f"MLflow tracking server {uri}: {who or 'an anonymous client'} may not "
                            "read experiments; ask its admin for a grant (infra/mlflow/bootstrap_users.py)")
    if reply.status_code != 200:
        raise TrackingError(f"{uri} does not answer as an MLflow tracking server "
                            f"(GET /api/2.0/mlflow/experiments/search: HTTP {reply.status_code})")


def artifact_location(cfg: ExperimentConfig, uri: str) -> str | None:
    """Local stores keep artifacts beside the run directory; a server decides for itself.

    Set explicitly because an experiment first created inside a Ray worker would otherwise get
    an artifact location under Ray's temporary directory.
    """
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    if storage.is_uri(cfg.run.storage_path) and uri.startswith("sqlite:///"):  # beside the store
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts" / cfg.run.experiment).as_uri()
    return (storage_dir(cfg) / "mlartifacts" / cfg.run.experiment).as_uri()


def open_run(cfg: ExperimentConfig, uri: str) -> str:
    """Creates the MLflow run of `cfg` (or reopens the one a run of the same name and storage
    path started) and logs the whole resolved config as params. Returns the run id."""
    check_reachable(uri)
    try:
        with mlflow_client(uri) as client:
            return _open_run(cfg, uri, client)
    except MlflowException as e:
        if e.error_code == "PERMISSION_DENIED":
            _, who = login(uri)
            raise TrackingError(
                f"MLflow tracking server {uri}: {who} may not write to experiment "
                f"{cfg.run.experiment!r}; training needs an account with EDIT on it (a writer of "
                "infra/mlflow/bootstrap_users.py)") from None
        raise TrackingError(f"MLflow tracking server {uri}: {e.message}") from None


def _open_run(cfg: ExperimentConfig, uri: str, client) -> str:
    experiment = client.get_experiment_by_name(cfg.run.experiment)
    experiment_id = (experiment.experiment_id if experiment else
                     client.create_experiment(cfg.run.experiment,
                                              artifact_location=artifact_location(cfg, uri)))
    where = storage_root(cfg)
    found = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{RUN_NAME_TAG}` = '{cfg.name}' and tags.`{STORAGE_TAG}` = '{where}'",
        max_results=1,
    )
    if found:
        run = found[0]
        client.update_run(run.info.run_id, status="RUNNING")
    else:
        run = client.create_run(experiment_id, run_name=cfg.name,
                                tags={RUN_NAME_TAG: cfg.name, STORAGE_TAG: where})
    logged = run.data.params if found else {}
    # A resumed run keeps the params it started with (MLflow refuses to change a param); a
    # changed value, e.g. a longer train.max_steps, is recorded as a tag instead.
    for key, value in _param_values(cfg).items():
        if key not in logged:
            client.log_param(run.info.run_id, key, value)
        elif logged[key] != value:
            client.set_tag(run.info.run_id, f"hint.resumed_with.{key}", value)
    client.log_text(run.info.run_id, json.dumps(redact(cfg.to_dict()), indent=2), "config.json")
    return run.info.run_id


@contextmanager
def tracking_uri_scope(uri: str | None) -> Iterator[None]:
    """`mlflow.set_tracking_uri(uri)` for one block (nothing when uri is None). MLflow's setter
    also writes $MLFLOW_TRACKING_URI, which resolve_tracking_uri reads: unscoped, one call would
    send every later run of this process to that store. A `user:password@` in `uri` reaches
    MLflow as MLFLOW_TRACKING_USERNAME / _PASSWORD for the block instead: MLflow prints its
    tracking URI (run links) and would print the password with it."""
    if uri is None:
        yield
        return
    saved = {k: os.environ.get(k) for k in (TRACKING_URI_ENV, *CREDENTIAL_ENVS)}
    mlflow.set_tracking_uri(credentials_to_env(uri))
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved.pop(TRACKING_URI_ENV))  # None unsets the variable again
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextmanager
def experiment_run(uri: str | None, experiment: str, run_name: str, *,
                   tags: dict[str, str] | None = None, artifact_location: str | None = None):
    """A new MLflow run in `experiment` (created if needed) of the store at `uri`, for one
    block. The experiment goes by id: `mlflow.set_experiment` would make it the process's active
    experiment, and a later run on another store would look for that id there."""
    with tracking_uri_scope(uri):
        found = mlflow.get_experiment_by_name(experiment)
        experiment_id = (found.experiment_id if found else
                         mlflow.create_experiment(experiment, artifact_location=artifact_location))
        with mlflow.start_run(run_name=run_name, experiment_id=experiment_id, tags=tags) as run:
            yield run


def credentials_to_env(uri: str) -> str:
    """`uri` without its user:password@, which go to MLFLOW_TRACKING_USERNAME / _PASSWORD of
    this process unless a login is set there already (MLflow's client prefers those too)."""
    clean, user, password = split_credentials(uri)
    if user and not (os.environ.get(USERNAME_ENV) and os.environ.get(PASSWORD_ENV)):
        os.environ[USERNAME_ENV], os.environ[PASSWORD_ENV] = user, password or ""
    return clean


@contextmanager
def mlflow_client(uri: str) -> Iterator[MlflowClient]:
    """An MlflowClient of `uri` for one block, logged in through the environment
    (tracking_uri_scope): MLflow prints the URI a client was given, run links included."""
    with tracking_uri_scope(uri):
        yield MlflowClient()


def close_run(uri: str, run_id: str, ok: bool) -> None:
    set_terminated(uri, run_id, "FINISHED" if ok else "FAILED")


def set_terminated(uri: str, run_id: str, status: str) -> None:
    """Ends a run with `status`. MLflow prints links to the run here: in mlflow_client, they
    name the server without the password."""
    with mlflow_client(uri) as client:
        client.set_terminated(run_id, status)


def _param_values(cfg: ExperimentConfig) -> dict[str, str]:
    """The config as MLflow params, secrets masked (a password in run.tracking_uri, say)."""
    out = {}
    for key, value in redact(cfg.flat()).items():
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
        mlflow.set_tracking_uri(credentials_to_env(uri))  # a worker process of this run's own
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

