"""MLflow tracking: where runs go, and what a training run logs there.

The driver resolves the tracking URI, checks that it answers (before any worker starts), and
creates or reopens the run; rank 0 of the workers then logs metrics, system metrics and
artifacts into that run by id. A run restarted under the same name and storage path continues
its MLflow run, so one training run is one MLflow run however often it resumed.
"""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import mlflow
import requests
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor
from mlflow.tracking import MlflowClient

from hint_platform import storage
from hint_platform.config import ExperimentConfig
from hint_platform.errors import UserError
from hint_platform.redact import redact, redact_text, split_credentials

RUN_NAME_TAG = "hint.run_name"
STORAGE_TAG = "hint.storage_path"
MAX_PARAM_CHARS = 6000  # MLflow's limit on a param value
STEP_METRIC = "step"
MAX_METRICS_PER_BATCH = 1000  # MLflow's limit on one log_batch
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
    if storage.is_uri(cfg.run.storage_path) and uri.startswith("sqlite:///"):
        return beside_store(uri, cfg.run.experiment)
    return (storage_dir(cfg) / "mlartifacts" / cfg.run.experiment).as_uri()


def beside_store(uri: str, experiment: str) -> str | None:
    """A SQLite store's artifacts go beside it (DIR/mlartifacts/EXPERIMENT), not under the
    caller's working directory (MLflow's default, ./mlruns); other stores decide for themselves."""
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts" / experiment).as_uri()
    return None


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
        location = artifact_location or beside_store(mlflow.get_tracking_uri(), experiment)
        experiment_id = (found.experiment_id if found else
                         mlflow.create_experiment(experiment, artifact_location=location))
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


_QUICK = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


@contextmanager
def _one_short_try() -> Iterator[None]:
    """MLflow's client with one try of at most 10 s per request, for one block: by itself it
    retries an unreachable server for minutes; RunLogger retries between training steps."""
    saved = {k: os.environ.get(k) for k in _QUICK}
    os.environ.update(_QUICK)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key)
            else:
                os.environ[key] = value


class RunLogger:
    """Rank 0's handle on the MLflow run: metrics (with system metrics at each log step) and the
    final artifacts. On other ranks (`active=False`) every method does nothing, so the train
    loop calls it unconditionally.

    A tracking server that does not answer never stops training. Metrics wait in a buffer,
    stamped when they were measured, and go in batches of whole steps: at a log call when the
    last failure's backoff (1 s, doubling to a minute) has passed, and at `close`, which retries
    for up to `retry_s` and then names what it could not log. While the server does not answer
    the buffer is also kept in `unlogged_file`, which the next logger of the run (a restarted
    worker group, a rerun) sends first: a worker that dies meanwhile loses nothing.

    Nothing is logged twice. After a failure (a batch may have been stored before its reply was
    lost), the steps the server holds are dropped from the buffer before it is sent again; a
    worker group restarted after a failure redoes the steps after the last checkpoint, and
    their metrics are logged once, by the first attempt (MLflow would keep both points of a
    step). The last step logged is the latest value of the `step` metric, which every step's
    batch carries.
    """

    def __init__(self, uri: str | None, run_id: str | None, active: bool, retry_s: float = 300.0,
                 unlogged_file: str | Path | None = None):
        self.active = bool(active and uri and run_id)
        if not self.active:
            return
        self.uri, self.run_id, self.retry_s = uri, run_id, retry_s
        self._client = MlflowClient(credentials_to_env(uri))
        self._system = SystemMetricsMonitor(run_id, tracking_uri=self._client.tracking_uri)
        self._file = Path(unlogged_file) if unlogged_file else None
        self._pending = _read_metrics(self._file) if self._file and self._file.is_file() else []
        self.last_step: int | None = None  # the server's, read at the first contact
        self._retry_at, self._backoff_s = 0.0, 1.0
        self._outage: str | None = None  # what the server did, while it does not answer

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        """Buffers `metrics` at `step` (unless a step this far was logged) and sends what is
        buffered unless the server is in a backoff."""
        if not self.active or (self.last_step is not None and step <= self.last_step):
            return
        values = ({k: float(v) for k, v in metrics.items()} | self._system_metrics()
                  | {STEP_METRIC: float(step)})
        stamp = int(time.time() * 1000)
        self._pending += [Metric(k, v, stamp, step) for k, v in values.items()]
        if not (time.monotonic() >= self._retry_at and self._attempt(self._send)):
            self._keep()  # in a backoff, or the server did not answer

    def _system_metrics(self) -> dict[str, float]:
        """CPU, memory, disk, network (and GPU) since the last call, by MLflow's monitors."""
        self._system.collect_metrics()
        values = self._system.aggregate_metrics()
        for monitor in self._system.monitors:
            monitor.clear_metrics()
        return {f"system/{k}": float(v) for k, v in values.items()}

    def _send(self) -> None:
        """Sends the buffer, a batch of whole steps at a time (one transaction each)."""
        if self.last_step is None:
            run = self._client.get_run(self.run_id)
            self.last_step = int(run.data.metrics.get(STEP_METRIC, 0))
            self._pending = [m for m in self._pending if m.step > self.last_step]
        while self._pending:
            batch: list[Metric] = []
            for _, group in itertools.groupby(self._pending, key=lambda m: m.step):
                group = list(group)
                if batch and len(batch) + len(group) > MAX_METRICS_PER_BATCH:
                    break
                batch += group
            self._client.log_batch(self.run_id, metrics=batch)
            del self._pending[:len(batch)]
            self.last_step = batch[-1].step
        if self._file and self._file.is_file():
            self._file.unlink()

    def _keep(self) -> None:
        """The buffer, to `unlogged_file` (JSON lines: key, value, timestamp, step)."""
        if self._file:
            self._file.write_text("".join(json.dumps({
                "key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step}) + "\n"
                for m in self._pending))

    def _attempt(self, call: Callable[[], None]) -> bool:
        """Runs `call`; on a tracking error, starts (or lengthens) the backoff and says so once
        per outage on the worker's log."""
        try:
            with _one_short_try():
                call()
        except (MlflowException, requests.RequestException, OSError) as e:
            self.last_step = None  # what a failed call stored is read back before the next
            self._retry_at = time.monotonic() + self._backoff_s
            self._backoff_s = min(2 * self._backoff_s, 60.0)
            if self._outage is None:
                print(f"MLflow {redact_text(self.uri)} does not answer ({type(e).__name__}); "
                      "training goes on, metrics are kept and retried", flush=True)
            self._outage = f"{type(e).__name__}: {redact_text(str(e))[:200]}"
            return False
        self._backoff_s, self._outage = 1.0, None
        return True

    def _retry(self, call: Callable[[], None], deadline: float) -> bool:
        """`call` attempted until it succeeds or `deadline` (time.monotonic()) passes."""
        while True:
            if self._attempt(call):
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(max(0.0, min(self._retry_at, deadline) - time.monotonic()))

    def close(self, artifacts: dict[str, Path] | None = None) -> list[str]:
        """Sends the buffered metrics and uploads `artifacts` (artifact path -> local
        directory), retrying for up to `retry_s`. Returns what could not be logged, each item
        a sentence (empty when everything was)."""
        if not self.active:
            return []
        self.active = False
        deadline = time.monotonic() + self.retry_s
        missing = []
        if not self._retry(self._send, deadline):
            self._keep()
            steps = sorted({m.step for m in self._pending})
            kept = f", kept in {self._file}" if self._file else ""
            missing.append(f"{len(self._pending)} metric values of steps {steps[0]}..{steps[-1]}{kept}")
        for path, local in (artifacts or {}).items():
            if not self._retry(lambda: self._client.log_artifacts(self.run_id, str(local), path),
                               deadline):
                missing.append(f"the {path!r} artifact (on disk at {local})")
        if missing:
            missing.insert(0, f"MLflow {redact_text(self.uri)} did not answer for {self.retry_s:g} s "
                              f"({self._outage})")
        return missing


def _read_metrics(path: Path) -> list[Metric]:
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [Metric(r["key"], r["value"], r["timestamp"], r["step"]) for r in rows]
