"""The registry round trip against a real `mlflow server` on loopback: a tiny training run
registers its export, an alias points at it, and a FRESH process loads `models:/NAME@ALIAS`
and predicts exactly what the export predicts here."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from hint_platform import config
from hint_platform.tracking import registry
from hint_platform.serving.predictor import CachedPredictor
from hint_platform.cli.train import train_and_register
from pipelines import train_tokenizer, write_suite

REPO = Path(__file__).resolve().parent.parent
INSTRUCTION = "Reverse the order of the items."
INPUTS = ["fox 3 red owl", "cat dog 7 blue gold"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    uri = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'db.sqlite'}",
         "--artifacts-destination", str(root / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
         "--workers", "1"],
        stdout=open(root / "server.log", "wb"), stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"mlflow server did not start: {(root / 'server.log').read_text()[-2000:]}")
                time.sleep(0.5)
        yield uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its workers: our own process group
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_trained_model_registered_aliased_and_loaded_in_a_fresh_process(mlflow_server, ray_local, tmp_path):
    suite = write_suite(tmp_path / "data", num_train_tasks=21, num_test_tasks=2, instances_per_task=8,
                        num_pretrain_docs=5)
    train_tokenizer(suite.texts(), tmp_path / "tok", vocab_size=200)
    cfg = config.load("demo/finetune").with_overrides({
        "name": "registry-test", "model.init_from": None, "data.tokenizer": str(tmp_path / "tok"),
        "data.train": [suite.sni_spec()], "data.eval": [],
        "train.max_steps": 2, "train.global_batch_size": 8, "train.micro_batch_size": 4,
        "run.storage_path": str(tmp_path / "runs"), "run.tracking_uri": mlflow_server,
        "run.register_as": "hint-registry-test",
    })
    summary = train_and_register(cfg)
    assert summary["registered"] == "models:/hint-registry-test/1"

    registry.set_alias(mlflow_server, "hint-registry-test", "champion", 1)
    (row,) = registry.list_versions(mlflow_server, "hint-registry-test")
    assert (row["version"], row["aliases"], row["run_id"]) == (1, ["champion"], summary["mlflow_run_id"])

    expected = CachedPredictor(summary["export_dir"]).predict([INSTRUCTION] * 2, INPUTS)
    script = (
        "import json, sys, pandas as pd, mlflow.pyfunc\n"
        "model = mlflow.pyfunc.load_model('models:/hint-registry-test@champion')\n"
        f"df = pd.DataFrame({{'instruction': [{INSTRUCTION!r}] * 2, 'input': {INPUTS!r}}})\n"
        "print(json.dumps(list(model.predict(df))))\n"
    )
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                         timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_unknown_names_are_clear_errors(mlflow_server, tmp_path):
    with pytest.raises(registry.RegistryError, match="no registered model named 'nope'"):
        registry.list_versions(mlflow_server, "nope")
    with pytest.raises(registry.RegistryError, match="models:/nope@champion"):
        registry.resolve_export("models:/nope@champion", mlflow_server)
    with pytest.raises(registry.RegistryError, match="not a model export"):
        registry.resolve_export(str(tmp_path))
