"""Shared test fixtures: the real corpus samples, one local Ray instance and one authenticated
MLflow server per session."""

import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """../shared/data beside the checkout. CI has it, so there its absence is a failure."""
    if not SHARED_DATA.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"shared data missing under CI: {SHARED_DATA}")
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def suite(tmp_path_factory):
    """A small synthetic instruction suite and its tokenizer directory, for training runs."""
    from pipelines import train_tokenizer, write_suite

    root = tmp_path_factory.mktemp("suite")
    s = write_suite(root, num_train_tasks=24, num_test_tasks=2, instances_per_task=4,
                    num_pretrain_docs=4)
    train_tokenizer(s.texts(), root / "tok", vocab_size=200)
    return s, str(root / "tok")


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One local Ray instance for the whole test session (Ray start-up costs seconds).

    Four logical CPUs on a 2-core machine: Train workers ask for fractions and Ray Data still
    gets CPUs (STACK.md: asking for every core hangs Ray Data).
    """
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(tmp_path_factory.mktemp("ray")))
    yield ray
    ray.shutdown()


@dataclass
class MlflowServer:
    """A real `mlflow server --app-name basic-auth` on 127.0.0.1 with the settings of
    infra/mlflow/basic_auth.ini and the users infra/mlflow/bootstrap_users.py creates."""

    uri: str
    root: Path
    logins: dict[str, dict[str, str]]  # user -> {MLFLOW_TRACKING_USERNAME, MLFLOW_TRACKING_PASSWORD}

    def env(self, user: str) -> dict[str, str]:
        return dict(self.logins[user])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(uri: str, proc: subprocess.Popen, log: Path) -> None:
    """Waits for the MLflow server `proc` to answer on `uri`; fails the test with the end of
    its log if it exits or does not answer within two minutes."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2):
                return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not start: {log.read_text()[-2000:]}")
            time.sleep(0.3)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """One authenticated MLflow server for the session: `admin`, the writer `hint` and the
    reader `viewer`, each with a random password."""
    root = tmp_path_factory.mktemp("mlflow")
    passwords = {user: secrets.token_urlsafe(18) for user in ("admin", "hint", "viewer")}
    for user in ("hint", "viewer"):
        (root / f"{user}-password").write_text(passwords[user])
    ini = (REPO / "infra" / "mlflow" / "basic_auth.ini").read_text()
    ini = re.sub(r"(?m)^database_uri = .*$", f"database_uri = sqlite:///{root / 'auth.db'}", ini)
    (root / "basic_auth.ini").write_text(ini)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(MLFLOW_AUTH_CONFIG_PATH=str(root / "basic_auth.ini"),
               MLFLOW_AUTH_ADMIN_PASSWORD=passwords["admin"],
               MLFLOW_FLASK_SERVER_SECRET_KEY=secrets.token_hex(16))
    bin_dir = Path(sys.executable).parent
    proc = subprocess.Popen(
        [str(bin_dir / "mlflow"), "server", "--app-name", "basic-auth",
         "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1"],
        env=env, stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT,
        start_new_session=True, cwd=root)
    try:
        wait_until_healthy(uri, proc, root / "server.log")
        bootstrap = subprocess.run(
            [sys.executable, str(REPO / "infra" / "mlflow" / "bootstrap_users.py"), uri,
             "--writer", f"hint={root / 'hint-password'}", "--reader", f"viewer={root / 'viewer-password'}"],
            env={**env, "MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": passwords["admin"]},
            capture_output=True, text=True, timeout=600)
        assert bootstrap.returncode == 0, bootstrap.stderr[-2000:]
        logins = {user: {"MLFLOW_TRACKING_USERNAME": user, "MLFLOW_TRACKING_PASSWORD": pw}
                  for user, pw in passwords.items()}
        yield MlflowServer(uri, root, logins)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: our own process group
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
