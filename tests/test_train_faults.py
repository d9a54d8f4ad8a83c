"""Training through faults, with real processes: the MLflow server SIGKILLed during a 2-worker
FSDP run and restarted on the same port and store (the run finishes; every metric step is there
once; the export is logged), a server that stays down (the run's record kept on disk and named).
The run starts from an export that carries its optimizer state, and its losses are those of a
plain loop that continues that state, not of a fresh optimizer."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from hint_platform.config import from_dict
from hint_platform.tracking.runs import RunLogger, tracking_uri_scope
from hint_platform.training.checkpoint import export_model, restore_optimizer
from hint_platform.training.driver import fit
from hint_platform.training.optim import build_optimizer
from hint_platform.training.worker import build_model, train_step
from conftest import free_port, wait_until_healthy
from pipelines import iter_records
from pipelines.collate import collate

# The server-killing callback runs in the Train controller, which cannot import this module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

STEPS = 6


class PlainServer:
    """`mlflow server` on loopback with a SQLite store: started, killed and started again on
    the same port and store."""

    def __init__(self, root: Path):
        self.root, self.port = root, free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        self.proc = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'db.sqlite'}",
             "--artifacts-destination", str(self.root / "artifacts"), "--host", "127.0.0.1",
             "--port", str(self.port), "--workers", "1"],
            env=env, stdout=open(self.root / "server.log", "ab"), stderr=subprocess.STDOUT,
            start_new_session=True, cwd=self.root)
        wait_until_healthy(self.uri, self.proc, self.root / "server.log")
        MlflowClient(self.uri).search_experiments()  # its first query is slow: before fit's check

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers
            self.proc.wait()


class KillServerAt(UserCallback):
    """On the Train controller: SIGKILLs the tracking server's process group after the report
    of step `kill`, and writes `marker` after the report of step `restart`."""

    def __init__(self, pgid: int, kill: int, restart: int, marker: Path):
        self.pgid, self.kill, self.restart, self.marker = pgid, kill, restart, marker

    def after_report(self, run_context, metrics, checkpoint):
        step = metrics[0].get("step")
        if step == self.kill:
            os.killpg(self.pgid, signal.SIGKILL)
        if step == self.restart:
            self.marker.write_text(str(time.time()))


def config(suite, **sections):
    s, tok = suite
    return from_dict({
        "name": "through-a-restart",
        "data": {"tokenizer": tok, "train": [s.sni_spec("def", max_per_task=1)],
                 "max_input_len": 32, "max_hyper_len": 48, "max_target_len": 16},
        # one global batch is a whole pass: every step trains on one pass of 24 examples
        "train": {"micro_batch_size": 4, "global_batch_size": 24, "log_every": 1, "lr": 1e-2,
                  "max_steps": STEPS, "checkpoint_every": 0, **sections.pop("train", {})},
        **sections,
    })


def plain_steps(cfg, model, optimizer, steps: int) -> list[float]:
    """Training as a plain loop in this process, one global batch a step: all the rows of a
    pass, pass e at step e + 1 (each pass draws its own one instance per task)."""
    d, m = cfg.data, cfg.train.micro_batch_size
    losses = []
    for epoch in range(steps):
        rows = list(iter_records(d.train, d.tokenizer, max_input_len=d.max_input_len,
                                 max_hyper_len=d.max_hyper_len, max_target_len=d.max_target_len,
                                 seed=d.seed, epoch=epoch))
        micro = [collate(rows[i:i + m]) for i in range(0, len(rows), m)]
        losses.append(float(train_step(model, optimizer, micro, cfg.train.grad_clip,
                                       cfg.train.z_loss)["loss"]))
    return losses


def plain_losses(cfg, restore: bool, steps: int = STEPS) -> list[float]:
    """cfg's run as a plain loop: the model from its export, the optimizer state the export
    carries continued (or a fresh optimizer)."""
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    if restore:
        restore_optimizer(cfg.model.init_from, model, optimizer)
    return plain_steps(cfg, model, optimizer, steps)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    server = PlainServer(tmp_path_factory.mktemp("mlflow"))
    server.start()
    yield server
    server.kill()


@pytest.fixture(scope="module")
def run_through_restart(suite, server, ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    first = config(suite)  # a first stage: three steps, exported with Adafactor's state
    torch.manual_seed(0)
    model = build_model(first)
    optimizer = build_optimizer(model, first.train)
    plain_steps(first, model, optimizer, 3)
    export_model(model, root / "stage1", first.data.tokenizer, optimizer, step=3)

    marker = root / "restart-now"
    restarted_at: list[float] = []

    def restart():
        deadline = time.monotonic() + 600
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        restarted_at.append(time.time())
        server.start()

    restarter = threading.Thread(target=restart, daemon=True)
    restarter.start()
    cfg = config(suite, model={"init_from": str(root / "stage1")},
                 train={"num_workers": 2, "max_failures": 0},
                 run={"storage_path": str(root / "runs"), "tracking_uri": server.uri})
    result = fit(cfg, run_config_callbacks=[KillServerAt(server.proc.pid, 2, 4, marker)])
    restarter.join(timeout=300)
    return cfg, result, server, restarted_at


def test_a_run_finishes_through_a_tracking_server_restart(run_through_restart):
    cfg, result, server, restarted_at = run_through_restart
    assert result.steps_done == STEPS and result.unlogged == []
    assert restarted_at, "the server was not killed and restarted during the run"
    client = MlflowClient(server.uri)
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    for key in ("loss", "step", "grad_norm", "tokens_per_s"):
        steps = [m.step for m in client.get_metric_history(result.mlflow_run_id, key)]
        assert sorted(steps) == list(range(1, STEPS + 1)), key  # every step, once
    # steps 3 and 4 were measured while the server was down, and logged after its restart
    measured = {m.step: m.timestamp for m in client.get_metric_history(result.mlflow_run_id, "loss")}
    assert measured[3] / 1000 < restarted_at[0]
    logged = {f.path for f in client.list_artifacts(result.mlflow_run_id, "export")}
    assert {"export/manifest.json", "export/model.safetensors",
            "export/optimizer.safetensors"} <= logged


def test_fine_tuning_continues_the_exported_optimizer_state(run_through_restart):
    cfg, result, server, _ = run_through_restart
    history = MlflowClient(server.uri).get_metric_history(result.mlflow_run_id, "loss")
    losses = [m.value for m in sorted(history, key=lambda m: m.step)]
    continued, fresh = plain_losses(cfg, restore=True), plain_losses(cfg, False, steps=2)
    assert losses == pytest.approx(continued, rel=1e-4)
    assert abs(losses[1] - fresh[1]) > 1e-3  # a fresh Adafactor's first step is another step


def test_a_server_that_stays_down_leaves_the_record_on_disk_and_names_it(server, tmp_path):
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    kept = tmp_path / "unlogged.jsonl"
    with tracking_uri_scope(server.uri):
        run = MlflowClient().create_run(MlflowClient().create_experiment("stays-down"))
    run_id = run.info.run_id
    logger = RunLogger(down, run_id, active=True, retry_s=1.0, unlogged_file=kept)
    for step in (1, 2, 3):
        logger.log_metrics({"loss": 1.0 / step}, step=step)
    # on disk from the first failure on: a worker killed now would lose nothing
    assert [json.loads(line)["step"] for line in kept.read_text().splitlines()][-1] == 3
    (tmp_path / "export").mkdir()
    missing = logger.close({"export": tmp_path / "export"})
    assert missing[0].startswith(f"MLflow {down} did not answer for 1 s")
    assert missing[1].endswith(f"metric values of steps 1..3, kept in {kept}")
    assert missing[2] == f"the 'export' artifact (on disk at {tmp_path / 'export'})"
    rows = [json.loads(line) for line in kept.read_text().splitlines()]
    assert [(m["key"], m["step"]) for m in rows if not m["key"].startswith("system/")] == [
        ("loss", 1), ("step", 1), ("loss", 2), ("step", 2), ("loss", 3), ("step", 3)]
    # the run's next logger (a restarted worker group, a rerun) sends them first, once
    logger = RunLogger(server.uri, run_id, active=True, unlogged_file=kept)
    logger.log_metrics({"loss": 0.25}, step=4)
    assert logger.close() == [] and not kept.exists()
    history = MlflowClient(server.uri).get_metric_history(run_id, "loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25)]
