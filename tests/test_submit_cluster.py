"""`hint submit` and `hint jobs` against a real two-node Ray cluster and the session's real,
authenticated MLflow server (tests/conftest.py), all on 127.0.0.1 (no `ray_local`: this cluster
has its own ports and temp dir, and `hint` runs as a subprocess because the test process may
already hold a Ray of its own). The nodes hold the MLflow login in their environment, as the
KubeRay pods do from the cluster's secret store; `hint submit` sends none (the Jobs API shows a
job's runtime environment to everyone), and no log shows it.

Every process started here is stopped by its session id at the end: each `ray start --block`
leads its own session, so a node's processes (raylet, GCS, workers) are exactly that session.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from hint_platform import cli
from hint_platform.training.checkpoint import TRAIN_STATE

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def session_pids(sid: int) -> list[int]:
    """Processes whose session id is `sid` (field 6 of /proc/PID/stat)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def kill_session(sid: int, sig: int = signal.SIGKILL) -> None:
    for pid in session_pids(sid):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


class LocalRayCluster:
    """`ray start --block` nodes on 127.0.0.1 with ports and a temp dir of their own."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.env = root, env
        self.nodes: list[subprocess.Popen] = []
        self.logs: list[Path] = []
        self.gcs_port, self.dashboard_port = free_ports(2)
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.taken = {self.gcs_port, self.dashboard_port}  # every port a node of this cluster uses

    def take(self, n: int, span: int = 1) -> list[int]:
        """n free ports, each the first of `span` ports, none of which this cluster already
        uses: `ray start` refuses a worker port range that holds another component's port."""
        firsts: list[int] = []
        while len(firsts) < n:
            first = free_ports(1)[0]
            block = set(range(first, first + span))
            if not self.taken & block:
                self.taken |= block
                firsts.append(first)
        return firsts

    def add_node(self, num_cpus: int) -> subprocess.Popen:
        head = not self.nodes
        ports = self.take(7)
        (worker_ports,) = self.take(1, span=201)
        args = [str(BIN / "ray"), "start", "--block", "--node-ip-address=127.0.0.1",
                f"--num-cpus={num_cpus}", f"--temp-dir={self.root}",
                f"--dashboard-agent-listen-port={ports[0]}", f"--dashboard-agent-grpc-port={ports[1]}",
                f"--runtime-env-agent-port={ports[2]}", f"--metrics-export-port={ports[3]}",
                f"--node-manager-port={ports[4]}", f"--object-manager-port={ports[5]}",
                f"--min-worker-port={worker_ports}", f"--max-worker-port={worker_ports + 200}"]
        if head:
            args += ["--head", f"--port={self.gcs_port}", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={self.dashboard_port}", f"--ray-client-server-port={ports[6]}"]
        else:
            args += [f"--address=127.0.0.1:{self.gcs_port}"]
        log = self.root.parent / f"node{len(self.nodes)}.log"
        node = subprocess.Popen(args, env=self.env, stdout=open(log, "w"), stderr=subprocess.STDOUT,
                                start_new_session=True, cwd=self.root.parent)
        self.nodes.append(node)
        self.logs.append(log)
        return node

    def check_running(self) -> None:
        """Fail with its log if a `ray start --block` has exited (a node that did not come up)."""
        for node, log in zip(self.nodes, self.logs):
            assert node.poll() is None, f"ray start exited {node.returncode}:\n{log.read_text()[-3000:]}"

    def stop(self) -> None:
        """SIGKILL every process of every node (Ray keeps no state here worth a clean exit)."""
        for node in self.nodes:
            kill_session(node.pid)
            node.wait()
        deadline = time.time() + 10  # killed processes leave /proc once reaped
        while time.time() < deadline and any(session_pids(n.pid) for n in self.nodes):
            time.sleep(0.2)


def wait_for(what: str, check, timeout_s: float, every_s: float = 0.5):
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        value = check()
        if value:
            return value
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def get_json(url: str, headers: dict | None = None):
    """The JSON reply of a GET, or None while the server is not (yet) answering."""
    try:
        reply = requests.get(url, headers=headers, timeout=5)
        return reply.json() if reply.ok else None
    except (requests.RequestException, ValueError):
        return None


TOKEN = secrets.token_hex(16)
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@dataclass
class Setup:
    cluster: LocalRayCluster
    env: dict[str, str]
    tracking_uri: str
    root: Path
    suite: object
    tokenizer: str
    mlflow: object  # conftest.MlflowServer

    @property
    def login(self) -> dict[str, str]:
        """The MLflow login `hint submit` hands to jobs (the writer `hint`)."""
        return self.mlflow.env("hint")

    def reader(self) -> MlflowClient:
        """An MLflow client of the test, logged in as the read-only `viewer`."""
        password = self.mlflow.logins["viewer"]["MLFLOW_TRACKING_PASSWORD"]
        return MlflowClient(tracking_uri=self.tracking_uri.replace("://", f"://viewer:{password}@"))

    def nodes(self) -> list[dict]:
        reply = get_json(f"{self.cluster.address}/api/v0/nodes?limit=100", AUTH) or {}
        found = reply.get("data", {}).get("result", {}).get("result", [])
        return [n for n in found if n["state"] == "ALIVE"]

    def write_config(self, name: str, **train) -> Path:
        cfg = {
            "name": name,
            "data": {"tokenizer": self.tokenizer, "max_input_len": 32, "max_hyper_len": 48,
                     "max_target_len": 16,
                     "train": [self.suite.sni_spec("def", max_per_task=2)]},
            "train": {"num_workers": 2, "cpus_per_worker": 0.5, "global_batch_size": 8,
                      "micro_batch_size": 4, "lr": 1e-2, "log_every": 1, **train},
            "run": {"storage_path": str(self.root / "runs"), "experiment": "cluster"},
        }
        path = self.root / "work" / f"{name}.yaml"
        path.parent.mkdir(exist_ok=True)
        path.write_text(yaml.safe_dump(cfg))
        return path


@pytest.fixture(scope="module")
def setup(mlflow_server):
    """A head (2 CPUs) and a second node (4 CPUs), token auth on; the nodes log in to MLflow as
    `hint` through their environment (infra/kuberay: the Secret hint-mlflow-client).

    A short temp dir of our own: Ray's socket paths under it must stay within 107 bytes."""
    from pipelines import train_tokenizer, write_suite

    root = Path(tempfile.mkdtemp(prefix="hint-submit-"))
    suite = write_suite(root / "suite", num_train_tasks=24, num_test_tasks=2,
                        instances_per_task=4, num_pretrain_docs=4)
    train_tokenizer(suite.texts(), root / "tok", vocab_size=200)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS") and not k.startswith("MLFLOW_")}
    env.update(PATH=f"{BIN}{os.pathsep}{env['PATH']}", HOME=str(root / "home"),
               RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=TOKEN, RAY_DATA_DISABLE_PROGRESS_BARS="1",
               RAY_TRAIN_ENABLE_PRINT_PATCH="0",
               RAY_agent_register_timeout_ms="120000",  # slow starts on a busy 2-core machine
               RAY_health_check_period_ms="1000")  # a killed node is noticed sooner
    env.update(mlflow_server.env("hint"))
    (root / "home").mkdir()
    cluster = LocalRayCluster(root / "ray", env)
    s = Setup(cluster, env, mlflow_server.uri, root, suite, str(root / "tok"), mlflow_server)
    try:
        cluster.add_node(num_cpus=2)
        wait_for("the dashboard", lambda: cluster.check_running() or
                 get_json(f"{cluster.address}/api/version", AUTH), 300)
        cluster.add_node(num_cpus=4)
        wait_for("two nodes", lambda: cluster.check_running() or len(s.nodes()) == 2, 300)
        yield s
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def hint(setup, monkeypatch):
    """The `hint` CLI in this process, holding the cluster's token (`hint jobs` and the refused
    submissions make HTTP calls only; the submission that runs is a subprocess, see above)."""
    monkeypatch.setenv("HOME", setup.env["HOME"])  # no ~/.ray/auth_token of this machine's
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)

    for key, value in setup.login.items():  # the user's own login: it stays on this machine
        monkeypatch.setenv(key, value)

    def run(*args: str, token: str = TOKEN) -> Result:
        monkeypatch.setenv("RAY_AUTH_TOKEN", token)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = cli.main(list(args))
        return Result(code, out.getvalue(), err.getvalue())

    return run


def job_id_of(output: str) -> str:
    match = re.search(r"^submitted (\S+):", output, re.M)
    assert match, output
    return match.group(1)


def train_workers(s: Setup) -> set[str]:
    """Node ids of the live Ray Train workers."""
    reply = get_json(f"{s.cluster.address}/api/v0/actors?limit=1000&detail=true", AUTH) or {}
    actors = reply.get("data", {}).get("result", {}).get("result", [])
    return {a["node_id"] for a in actors
            if "RayTrainWorker" in a.get("class_name", "") and a["state"] == "ALIVE"}


@pytest.fixture(scope="module")
def finished_job(setup):
    """`hint submit --wait` of a 2-worker run (6 steps, checkpoints every 2); once step 3 is in
    MLflow and a Train worker runs on the second node, that node's processes are SIGKILLed."""
    s = setup
    config = s.write_config("survivor", max_steps=6, checkpoint_every=2, max_failures=2)
    log = s.root / "submit.log"
    submitted = subprocess.Popen(
        [str(BIN / "hint"), "submit", str(config), "--address", s.cluster.address, "--wait",
         "--working-dir", str(config.parent), "--tracking-uri", s.tracking_uri],
        env={**s.env, **s.login}, cwd=s.root, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    mlflow = s.reader()
    (second,) = [n["node_id"] for n in s.nodes() if not n["is_head_node"]]

    def step_three_logged():
        assert submitted.poll() is None, log.read_text()
        experiment = mlflow.get_experiment_by_name("cluster")
        runs = mlflow.search_runs([experiment.experiment_id]) if experiment else []
        return runs and any(m.step >= 3 for m in mlflow.get_metric_history(runs[0].info.run_id, "loss"))

    wait_for("step 3 in MLflow", step_three_logged, 400, every_s=0.3)
    workers_on = train_workers(s)
    kill_session(s.cluster.nodes[1].pid)
    submitted.wait(timeout=500)
    return {"rc": submitted.returncode, "output": log.read_text(), "config": config,
            "workers_on": workers_on, "second": second}


def test_submitted_run_survives_losing_a_node(setup, finished_job):
    s, job = setup, finished_job
    assert job["second"] in job["workers_on"], f"no Train worker was on the second node: {job}"
    assert job["rc"] == 0, job["output"][-3000:]
    assert re.search(r"^job \S+ SUCCEEDED", job["output"], re.M), job["output"][-3000:]
    assert [n["is_head_node"] for n in s.nodes()] == [True]  # it finished on what was left

    mlflow = s.reader()
    (run,) = mlflow.search_runs([mlflow.get_experiment_by_name("cluster").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert {m.step for m in mlflow.get_metric_history(run.info.run_id, "loss")} == set(range(1, 7))

    # Every step done once: the last checkpoint is step 6 of epoch 0, and its bitmap of
    # trained examples covers each of the 48 examples exactly once.
    states = [load_file(str(p)) for p in (s.root / "runs" / "survivor").rglob(TRAIN_STATE)]
    final = max(states, key=lambda st: int(st["step"]))
    assert int(final["step"]) == 6 and int(final["epoch"]) == 0
    assert int(final["consumed"].sum()) == 48


def test_hint_jobs_on_that_job(setup, finished_job, hint):
    s = setup
    job_id = job_id_of(finished_job["output"])
    address = ["--address", s.cluster.address]
    listed = hint("jobs", "list", *address)
    assert listed.returncode == 0, listed.stderr
    (row,) = [line for line in listed.stdout.splitlines() if line.startswith(job_id)]
    assert "SUCCEEDED" in row and "hint train survivor.yaml" in row
    status = hint("jobs", "status", job_id, *address)
    assert status.stdout.startswith(f"{job_id} SUCCEEDED"), status.stderr
    logs = hint("jobs", "logs", job_id, *address)
    assert "steps: 6" in logs.stdout, logs.stdout[-2000:]
    # The job logged in as `hint` (its run is in MLflow) with its nodes' login: the job as the
    # Jobs API shows it to anyone (runtime env included), its logs and every Ray log of the
    # cluster (the runtime-env agent's included) hold no password.
    password = s.login["MLFLOW_TRACKING_PASSWORD"]
    info = requests.get(f"{s.cluster.address}/api/jobs/{job_id}", headers=AUTH, timeout=30).json()
    assert info["runtime_env"]["env_vars"] == {"MLFLOW_TRACKING_URI": s.tracking_uri}, info["runtime_env"]
    assert password not in json.dumps(info)
    raw = requests.get(f"{s.cluster.address}/api/jobs/{job_id}/logs", headers=AUTH, timeout=30).json()["logs"]
    assert "steps: 6" in raw and password not in raw + logs.stdout + finished_job["output"]
    ray_logs = [p for p in (s.cluster.root / "session_latest" / "logs").rglob("*") if p.is_file()]
    holding = {p.name for p in ray_logs if password.encode() in p.read_bytes()}
    assert len(ray_logs) > 20 and {p.name for p in ray_logs if p.name.startswith("job-driver")}
    assert not holding, holding
    stop = hint("jobs", "stop", job_id, *address)
    assert stop.returncode == 0 and "not running" in stop.stdout
    unknown = hint("jobs", "status", "hint-nope", *address)
    assert unknown.returncode == 2 and "no job 'hint-nope'" in unknown.stderr


def test_hint_jobs_stop_a_running_job(setup, hint):
    s = setup
    config = s.write_config("stopped", max_steps=10_000, checkpoint_every=0)
    address = ["--address", s.cluster.address]
    submitted = hint("submit", str(config), *address, "--working-dir", str(config.parent),
                       "--tracking-uri", s.tracking_uri)
    assert submitted.returncode == 0, submitted.stderr
    job_id = job_id_of(submitted.stdout)
    wait_for("the job to run", lambda: "RUNNING" in hint("jobs", "status", job_id, *address).stdout, 120)
    assert "stop requested" in hint("jobs", "stop", job_id, *address).stdout
    wait_for("the job to stop", lambda: "STOPPED" in hint("jobs", "status", job_id, *address).stdout, 120)


def test_bad_input_is_refused_before_anything_is_submitted(setup, hint):
    s = setup
    config = s.write_config("refused", max_steps=2)
    address = ["--address", s.cluster.address, "--working-dir", str(config.parent)]
    before = hint("jobs", "list", "--address", s.cluster.address).stdout

    cases = {
        "cannot reach a Ray cluster": hint("submit", str(config), "--working-dir", str(config.parent),
                                           "--address", f"http://127.0.0.1:{free_ports(1)[0]}"),
        "requires a token": hint("submit", str(config), *address, token=""),
        "refused our token": hint("submit", str(config), *address, token="wrong"),
        "train.global_batch_size (8) must be a multiple": hint(
            "submit", str(config), "train.micro_batch_size=3", *address),
        "run.storage_path='runs'": hint("submit", str(config), "run.storage_path=runs", *address),
    }
    for reason, result in cases.items():
        assert result.returncode == 2, (reason, result.stdout, result.stderr)
        assert reason in result.stderr, (reason, result.stderr)
        assert "submitted" not in result.stdout
    assert hint("jobs", "list", "--address", s.cluster.address).stdout == before
