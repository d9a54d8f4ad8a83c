"""Running experiments on a Ray cluster through Ray Jobs: `hint submit` and `hint jobs`.

A submitted job runs the platform's own entrypoint, `hint train CONFIG key=value ...`, on the
cluster. Its runtime environment carries the working directory (code and configs; not
virtualenvs, run outputs or data), the MLflow tracking URI and the user's environment variables.
No secret travels with a job: its entrypoint, metadata and runtime environment are shown to
everyone who lists the cluster's jobs (the Jobs API, the dashboard) and land in Ray's logs (the
runtime-env agent logs every environment it sets up). The job logs in to MLflow as the cluster
does: MLFLOW_TRACKING_USERNAME / _PASSWORD (or _TOKEN) in the environment of its nodes, from the
cluster's own secret store (infra/kuberay mounts the Secret hint-mlflow-client into every pod).
A config, override, tracking URI or `--env` variable that holds a secret is refused, naming
where it belongs; what `hint` prints of a job is redacted.
What can be checked from the laptop is checked before anything is sent: the config validates
as `hint train --dry-run` validates it (training/preflight.py: the model section, the sources,
what needs no data; inputs that this machine does not see are the cluster's), every path the run
reads or writes is on storage every node reaches, and the address answers as a Ray dashboard
that accepts our token.

Token authentication (Ray >= 2.52): the token comes from RAY_AUTH_TOKEN, else the file named by
RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token (what `ray get-auth-token` prints), and is sent as a
bearer header whether or not RAY_AUTH_MODE is set here; a cluster without auth ignores it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import requests
from ray.job_submission import JobSubmissionClient

from hint_platform import config as config_lib
from hint_platform.errors import UserError
from hint_platform.redact import redact
from hint_platform.tracking.runs import PASSWORD_ENV, TOKEN_ENV, TRACKING_URI_ENV, USERNAME_ENV
from hint_platform.training.preflight import check

# Never uploaded with a job (Ray's gitignore-style patterns): virtualenvs, VCS, run outputs,
# MLflow stores, data and caches. Data and outputs live on shared storage instead.
WORKING_DIR_EXCLUDES = [
    ".venv", "venv", ".git", "/runs", "/mlruns", "/mlartifacts", "mlflow.db", "/data",
    "__pycache__", "*.egg-info", ".pytest_cache", "/.whl", "/.gpu_data", "/.gl", "build",
]

FINISHED = ("SUCCEEDED", "FAILED", "STOPPED")

_SECRET_HELP = (
    "a job's entrypoint and runtime environment are shown to everyone who can list the cluster's "
    "jobs and land in Ray's logs. Put the secret in the cluster's own secret store, as the pods' "
    f"environment: the MLflow login as {USERNAME_ENV} and {PASSWORD_ENV} (or {TOKEN_ENV}) from the "
    "Secret hint-mlflow-client that infra/kuberay/*-cluster.yaml mounts; any other secret likewise "
    "(a Secret, env valueFrom.secretKeyRef in the RayCluster). The job reads it from there")

_TOKEN_HELP = ("set RAY_AUTH_TOKEN (or RAY_AUTH_TOKEN_PATH, or ~/.ray/auth_token) to the cluster's "
               "token: `ray get-auth-token` on the head node prints it")


@dataclass
class JobRequest:
    """Everything `JobSubmissionClient.submit_job` is given, decided before contacting the cluster."""

    submission_id: str
    entrypoint: str
    runtime_env: dict
    metadata: dict[str, str]


def build_request(
    config_path: str | Path,
    overrides: list[str],
    *,
    working_dir: str | Path = ".",
    name: str | None = None,
    tracking_uri: str | None = None,
    env_vars: dict[str, str] | None = None,
    shared_dir: str | None = None,
) -> JobRequest:
    """Validate the experiment and build the job. Raises UserError, naming what is wrong.

    `shared_dir` (a shared filesystem path or a URI every node reaches) is where the config's
    relative paths go: `runs` becomes `<shared_dir>/runs`, as overrides in the entrypoint.
    With a `tracking_uri` (no password in it), the job logs to that server, logged in as the
    cluster's nodes are; without one, the cluster's own MLflow settings apply.
    """
    working_dir = Path(working_dir).resolve()
    config_path = config_lib.find(config_path).resolve()
    if not config_path.is_relative_to(working_dir):
        raise UserError(
            f"config {config_path} is outside the working directory {working_dir} that is "
            "uploaded with the job: move it there or pass --working-dir"
        )
    overrides = list(overrides) + ([f"name={name}"] if name else [])
    cfg = config_lib.load(config_path, overrides)
    if shared_dir:
        if _is_relative(shared_dir):
            raise UserError(f"--shared-dir {shared_dir}: expected an absolute path or a URI")
        overrides += shared_overrides(cfg, shared_dir)
        cfg = config_lib.load(config_path, overrides)
    unshared = unshared_paths(cfg)
    if unshared:
        raise UserError(
            "a submitted run reads and writes only storage every node reaches (an s3:// or gs:// "
            "URI, or a shared filesystem path such as /mnt/shared/...); a relative path resolves "
            "in the job's temporary working directory on one node. Not shared: "
            + "; ".join(f"{key}={value!r}" for key, value in unshared)
            + ". Override them, or pass --shared-dir DIR to put them under DIR"
        )
    check(cfg)

    leaked = [key for key, value in redact(cfg.flat()).items() if value != cfg.flat()[key]]
    if leaked:
        raise UserError(f"{', '.join(leaked)}: a secret in the job's config or entrypoint; "
                        + _SECRET_HELP)

    relative = config_path.relative_to(working_dir).as_posix()
    request = command_request(["train", relative, *overrides], working_dir=working_dir,
                              run_name=cfg.name, tracking_uri=tracking_uri, env_vars=env_vars)
    request.metadata["hint_config"] = relative
    return request


def command_request(argv: list[str], *, working_dir: str | Path, run_name: str,
                    tracking_uri: str | None = None,
                    env_vars: dict[str, str] | None = None) -> JobRequest:
    """The job that runs `hint ARGV...` with the working directory, the tracking URI and the
    environment variables; refused when any of them, or ARGV, holds a secret (ARGV's config is
    the caller's to check: `hint train`'s, `hint paper run`'s plan)."""
    env = dict(env_vars or {})
    if tracking_uri:
        env[TRACKING_URI_ENV] = tracking_uri
    entrypoint = shlex.join(["hint", *argv])
    shown = {"the command": entrypoint, "--env": {k: v for k, v in env.items() if k != TRACKING_URI_ENV},
             "the tracking URI": tracking_uri}
    leaked = [where for where, value in shown.items() if redact(value) != value]
    if leaked:
        raise UserError(f"{', '.join(leaked)}: holds a secret; " + _SECRET_HELP)
    return JobRequest(
        submission_id=f"hint-{run_name}-{uuid.uuid4().hex[:8]}",
        entrypoint=entrypoint,
        runtime_env={"working_dir": str(Path(working_dir).resolve()),
                     "excludes": WORKING_DIR_EXCLUDES, "env_vars": env},
        metadata={"hint_run": run_name},
    )


_PATH_KEYS = ("run.storage_path", "data.tokenizer", "model.init_from")


def unshared_paths(cfg: config_lib.ExperimentConfig) -> list[tuple[str, str]]:
    """(key, path) for every path of the run that is relative, so not on shared storage."""
    flat = cfg.flat()
    paths = [(key, flat[key]) for key in _PATH_KEYS]
    for split in ("train", "eval"):
        for i, source in enumerate(getattr(cfg.data, split)):
            paths.append((f"data.{split}[{i}].path", source.get("path")))
    return [(key, p) for key, p in paths if _is_relative(p)]


def shared_overrides(cfg: config_lib.ExperimentConfig, shared_dir: str) -> list[str]:
    """`key=value` overrides that move every relative path of `cfg` under `shared_dir`."""
    base = shared_dir.rstrip("/")
    flat = cfg.flat()
    overrides = [f"{key}={base}/{flat[key]}" for key in _PATH_KEYS if _is_relative(flat[key])]
    for split in ("train", "eval"):
        sources = getattr(cfg.data, split)
        if any(_is_relative(s.get("path")) for s in sources):
            moved = [s | {"path": f"{base}/{s['path']}"} if _is_relative(s.get("path")) else s
                     for s in sources]
            overrides.append(f"data.{split}={json.dumps(moved)}")  # JSON is YAML: one value
    return overrides


def _is_relative(path: str | None) -> bool:
    """A local relative path: not a URI (s3://...) and not absolute (a shared mount)."""
    return bool(path) and "://" not in path and not Path(path).is_absolute()


def auth_headers() -> dict[str, str]:
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token"
        if Path(path).is_file():
            token = Path(path).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def resolve_address(address: str | None) -> str:
    address = address or os.environ.get("RAY_API_SERVER_ADDRESS") or os.environ.get("RAY_ADDRESS")
    if not address:
        raise UserError("no cluster address: pass --address http://HEAD:8265 "
                        "(or set RAY_API_SERVER_ADDRESS)")
    if "://" not in address:
        address = f"http://{address}"
    if not address.startswith(("http://", "https://")):
        raise UserError(f"--address {address}: expected the dashboard's http(s)://HOST:PORT")
    return address.rstrip("/")


def connect(address: str | None, timeout_s: float = 10.0):
    """A JobSubmissionClient for a dashboard that answered, with our token; else UserError."""
    address = resolve_address(address)
    headers = auth_headers()
    try:
        reply = requests.get(f"{address}/api/version", headers=headers, timeout=timeout_s)
    except requests.RequestException as e:
        raise UserError(f"cannot reach a Ray cluster at {address}: {type(e).__name__}") from None
    if reply.status_code == 401:
        raise UserError(f"the Ray cluster at {address} requires a token: {_TOKEN_HELP}")
    if reply.status_code == 403:
        raise UserError(f"the Ray cluster at {address} refused our token: {_TOKEN_HELP}")
    try:
        reply.raise_for_status()
        reply.json()["ray_version"]
    except (requests.HTTPError, ValueError, KeyError):
        raise UserError(f"{address} does not answer as a Ray dashboard "
                        f"(GET /api/version: HTTP {reply.status_code})") from None
    return JobSubmissionClient(address, headers=headers)


def submit(client, request: JobRequest) -> str:
    return client.submit_job(
        entrypoint=request.entrypoint,
        submission_id=request.submission_id,
        runtime_env=request.runtime_env,
        metadata=request.metadata,
    )


def follow(client, job_id: str, out: TextIO = sys.stdout) -> str:
    """Stream the job's logs to `out` until it finishes; returns its final status."""

    async def tail() -> None:
        async for chunk in client.tail_job_logs(job_id):
            out.write(chunk)
            out.flush()

    asyncio.run(tail())
    return str(job_info(client, job_id).status)


def job_info(client, job_id: str):
    try:
        return client.get_job_info(job_id)
    except RuntimeError as e:  # what the client raises for an unknown id (HTTP 404)
        if "404" in str(e) or "does not exist" in str(e):
            raise UserError(f"no job {job_id!r} on this cluster (`hint jobs list` shows them)") from None
        raise
