"""Runs on an object store: `run.storage_path: s3://bucket/prefix` puts Ray Train's checkpoints
and the export in the bucket, the training data is read from it, and a second run resumes from
the checkpoint there. Against moto's S3 server on 127.0.0.1 (a real S3 API over HTTP that no one
here wrote); `hint train` runs as a subprocess with its own Ray, whose workers inherit the
endpoint and credentials from the environment, as pods do. What cannot live in an object store
is refused before any work, naming the key."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.fs as pafs
import pytest
import requests
import yaml
from safetensors.torch import load

from hint_platform import config, storage
from hint_platform.config import ConfigError
from hint_platform.errors import UserError
from hint_platform.tracking import runs
from hint_platform.training.checkpoint import latest_train_state
from hint_platform.training.preflight import check

BIN = Path(sys.executable).parent
BUCKET = "hint-runs"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's standalone S3 server on a free loopback port, with one bucket; yields the
    environment a client needs to reach it."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    server = subprocess.Popen([str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1",
           "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        deadline = time.time() + 60
        while True:
            try:
                requests.get(endpoint, timeout=2)
                break
            except requests.RequestException:
                assert server.poll() is None and time.time() < deadline, log.read_text()
                time.sleep(0.3)
        pafs.S3FileSystem(endpoint_override=endpoint, access_key="testing", secret_key="testing",
                          region="us-east-1", allow_bucket_creation=True).create_dir(BUCKET)
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=20)


def bucket_files(env: dict[str, str], prefix: str) -> dict[str, int]:
    """Every file under s3://BUCKET/prefix: path inside the prefix -> size."""
    fs = pafs.S3FileSystem(endpoint_override=env["AWS_ENDPOINT_URL"], access_key="testing",
                           secret_key="testing", region="us-east-1")
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True))
    return {i.path.removeprefix(f"{BUCKET}/{prefix}/"): i.size for i in infos
            if i.type == pafs.FileType.File}


def test_a_run_checkpoints_exports_reads_and_resumes_in_the_bucket(s3, tmp_path, monkeypatch, request):
    from pipelines import train_tokenizer, write_suite

    for key, value in s3.items():
        monkeypatch.setenv(key, value)
    suite = write_suite(tmp_path / "suite", num_train_tasks=8, num_test_tasks=2,
                        instances_per_task=4, num_pretrain_docs=2)
    train_tokenizer(suite.texts(), tmp_path / "tok", vocab_size=200)
    fs, _ = pafs.FileSystem.from_uri(f"s3://{BUCKET}/x")
    pafs.copy_files(suite.sni_path, f"{BUCKET}/data/sni", destination_filesystem=fs)
    cfg = {
        "name": "remote",
        "data": {"tokenizer": str(tmp_path / "tok"), "max_input_len": 32, "max_hyper_len": 48,
                 "max_target_len": 16,
                 "train": [{**suite.sni_spec("def", max_per_task=2), "path": f"s3://{BUCKET}/data/sni"}]},
        "train": {"num_workers": 2, "cpus_per_worker": 0.5, "global_batch_size": 4,
                  "micro_batch_size": 2, "lr": 1e-2, "log_every": 1, "checkpoint_every": 1,
                  "max_steps": 2},
        "run": {"storage_path": f"s3://{BUCKET}/runs/", "tracking_uri": "sqlite:///mlflow.db"},
    }
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "remote.yaml").write_text(yaml.safe_dump(cfg))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI")}
    ray_tmp = tempfile.mkdtemp(prefix="hint-s3-")  # short: Ray's socket paths stay within 107 bytes
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env.update(RAY_TMPDIR=ray_tmp, RAY_DATA_DISABLE_PROGRESS_BARS="1", RAY_TRAIN_ENABLE_PRINT_PATCH="0")

    def train(*overrides: str) -> None:
        done = subprocess.run([str(BIN / "hint"), "train", "remote.yaml", *overrides], env=env,
                              cwd=tmp_path / "work", capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]

    train()
    files = bucket_files(s3, "runs/remote")
    checkpoints = sorted({f.split("/")[0] for f in files if f.startswith("checkpoint_") and "/" in f})
    assert checkpoints, sorted(files)
    for name in ("train_state.safetensors", "model_config.json", ".metadata"):
        assert f"{checkpoints[-1]}/{name}" in files, sorted(files)
    for name in ("config.json", "model.safetensors", "tokenizer/spiece.model"):
        assert files.get(f"export/{name}", 0) > 0, sorted(files)
    # Nothing went to a local directory named after the URI (the old `<cwd>/s3:/...`).
    assert not list((tmp_path / "work").glob("s3*")) and not list(tmp_path.glob("s3*"))

    train("train.max_steps=3")  # the same run, longer: it resumes from step 2 in the bucket
    latest = runs.storage_root(config.from_dict(cfg)) + "/remote"
    assert latest_train_state(latest).step == 3
    first = [c for c in bucket_files(s3, "runs/remote") if c.endswith("train_state.safetensors")]
    steps = sorted(int(load(storage.read_bytes(f"s3://{BUCKET}/runs/remote/{c}"))["step"]) for c in first)
    assert steps[-1] == 3 and len(steps) <= 2  # Ray Train keeps the newest two


def test_what_cannot_live_in_an_object_store_is_refused_before_any_work(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    base = {"name": "x", "data": {"tokenizer": str(tmp_path), "train": [
        {"kind": "sni", "path": "s3://b/sni", "format": "def"}]},
        "run": {"storage_path": "s3://b/runs"}}
    cfg = config.from_dict(base)
    assert runs.storage_root(cfg) == "s3://b/runs"
    with pytest.raises(UserError, match="run.storage_path=s3://b/runs: this command keeps its files"):
        runs.storage_dir(cfg)  # `hint eval`, `hint data prepare`, `hint tune`, `hint paper run`
    with pytest.raises(UserError, match="default SQLite tracking store cannot live"):
        runs.resolve_tracking_uri(cfg)
    with pytest.raises(UserError, match="unsupported scheme hdfs://"):
        check(cfg.with_overrides({"run.storage_path": "hdfs://nn/runs"}))
    for key in ("model.init_from", "data.tokenizer"):
        with pytest.raises(ConfigError, match=f"{key}=s3://b/t5: a model and its tokenizer are read from a local"):
            check(cfg.with_overrides({key: "s3://b/t5"}))
