"""Training on real Ray workers: 2-worker FSDP against a plain single-process loop, a run
restarted and a worker killed mid-run against an uninterrupted reference, MLflow contents,
the export, and the errors a user meets first. Tiny model, synthetic suite, few steps."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import psutil
import pytest
import ray.cloudpickle
import torch
from mlflow.tracking import MlflowClient
from ray.train import UserCallback
from safetensors.torch import load_file

from hint_platform.checkpoint import TRAIN_STATE
from hint_platform.config import ConfigError, from_dict
from hint_platform.optim import build_optimizer
from hint_platform.tracking import TrackingError
from hint_platform.train import build_model, fit, train_step
from pipelines import collate, iter_records, train_tokenizer, write_suite

# The kill callback runs in the Train controller, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LENGTHS = dict(max_input_len=32, max_hyper_len=48, max_target_len=16)


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    s = write_suite(root, num_train_tasks=24, num_test_tasks=2, instances_per_task=4,
                    num_pretrain_docs=4)
    train_tokenizer(s.texts(), root / "tok", vocab_size=200)
    return s, str(root / "tok")


def make_cfg(suite, storage, name, *, per_task, **train):
    s, tok = suite
    return from_dict({
        "name": name,
        "data": {"tokenizer": tok, "train": [s.sni_spec("def", max_per_task=per_task)], **LENGTHS},
        "train": {"micro_batch_size": 4, "log_every": 1, "lr": 1e-2, **train},
        "run": {"storage_path": str(storage)},
    })


def reference_losses(cfg, steps: int) -> tuple[list[float], torch.nn.Module]:
    """The same training as a plain loop in this process: rows in stream order, epoch after
    epoch, `global_batch_size` rows a step, one micro-batch at a time."""
    d = cfg.data
    rows = list(iter_records(d.train, d.tokenizer, max_input_len=d.max_input_len,
                             max_hyper_len=d.max_hyper_len, max_target_len=d.max_target_len))
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    g, m = cfg.train.global_batch_size, cfg.train.micro_batch_size
    per_epoch = len(rows) // g
    losses = []
    for step in range(steps):
        batch = rows[(step % per_epoch) * g:(step % per_epoch + 1) * g]
        micro = [collate(batch[i:i + m]) for i in range(0, g, m)]
        micro = [{k: b[k] for k in ("hyper_input_ids", "hyper_attention_mask", "input_ids",
                                   "attention_mask", "labels")} for b in micro]
        losses.append(train_step(model, optimizer, micro, cfg.train.grad_clip)["loss"])
    return losses, model


def loss_history(result) -> list[tuple[int, float]]:
    uri = f"sqlite:///{Path(result.run_dir).parent / 'mlflow.db'}"
    history = MlflowClient(tracking_uri=uri).get_metric_history(result.mlflow_run_id, "loss")
    return sorted((m.step, m.value) for m in history)


def final_train_state(result) -> dict:
    return load_file(str(Path(result.checkpoint_path) / TRAIN_STATE))


class KillWorkerAfter(UserCallback):
    """On the Train controller: SIGKILLs the last Train worker process once, after the report
    of `step` (the controller and the workers are children of the same raylet)."""

    def __init__(self, step: int):
        self.step = step
        self.done = False

    def after_report(self, run_context, metrics, checkpoint):
        if self.done or metrics[0].get("step") != self.step:
            return
        workers = [p for p in psutil.Process(os.getppid()).children()
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        os.kill(workers[-1].pid, signal.SIGKILL)
        self.done = True


@pytest.fixture(scope="module")
def fsdp_run(suite, ray_local, tmp_path_factory):
    """2 workers, FSDP; the dataset (24 examples) is exactly one global batch, so every step
    trains on the same examples however the workers split them. Rank 1 is SIGKILLed after
    step 3 and the run resumes from the step-2 checkpoint."""
    cfg = make_cfg(suite, tmp_path_factory.mktemp("runs"), "fsdp", per_task=1, num_workers=2,
                   global_batch_size=24, max_steps=4, checkpoint_every=2, max_failures=1)
    return cfg, fit(cfg, run_config_callbacks=[KillWorkerAfter(step=3)])


def test_fsdp_matches_one_process_through_a_killed_worker(fsdp_run):
    cfg, result = fsdp_run
    history = loss_history(result)
    expected, model = reference_losses(cfg, 4)
    assert result.steps_done == 4
    assert [s for s, _ in history].count(3) == 2  # step 3 ran, the worker died, step 3 again
    for step, value in history:
        assert value == pytest.approx(expected[step - 1], rel=1e-4), step
    assert expected[-1] < expected[0] - 1.0  # and the loss falls
    exported = load_file(str(Path(result.export_dir) / "model.safetensors"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(exported[name], value, rtol=1e-3, atol=1e-5)


def test_mlflow_run_holds_params_metrics_artifacts(fsdp_run):
    cfg, result = fsdp_run
    client = MlflowClient(tracking_uri=f"sqlite:///{Path(result.run_dir).parent / 'mlflow.db'}")
    run = client.get_run(result.mlflow_run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.num_workers"] == "2"
    assert run.data.params["model.preset"] == "tiny"
    for key in ("loss", "grad_norm", "tokens_per_s", "examples_per_s", "data_wait_fraction"):
        assert key in run.data.metrics
    assert any(k.startswith("system/") for k in run.data.metrics)
    export = {a.path for a in client.list_artifacts(run.info.run_id, "export")}
    assert {"export/config.json", "export/model.safetensors", "export/tokenizer"} <= export
    assert run.info.artifact_uri.startswith(Path(result.run_dir).parent.as_uri())


def test_restarted_run_resumes_model_optimizer_and_data(suite, ray_local, tmp_path):
    """1 worker (a deterministic row order): a run stopped after 4 steps, then restarted under
    the same name with 8. Every step's loss equals an uninterrupted plain loop's, and the 48
    examples are trained once per epoch (6 steps an epoch; the run ends 2 steps into the
    second, having resumed mid-epoch)."""
    first = make_cfg(suite, tmp_path, "resume", per_task=2, num_workers=1,
                     global_batch_size=8, max_steps=4, checkpoint_every=2)
    fit(first)
    result = fit(first.with_overrides(["train.max_steps=8"]))
    assert result.steps_done == 8
    expected, _ = reference_losses(first, 8)
    history = loss_history(result)
    assert [s for s, _ in history] == list(range(1, 9))
    assert [v for _, v in history] == pytest.approx(expected, rel=1e-4)
    state = final_train_state(result)
    assert int(state["step"]) == 8 and int(state["epoch"]) == 1
    assert int(state["consumed"].sum()) == 16


def test_bad_inputs_fail_before_workers_start(suite, tmp_path):
    cfg = make_cfg(suite, tmp_path, "bad", per_task=1, max_steps=1)
    with pytest.raises(TrackingError, match="http://127.0.0.1:9"):
        fit(cfg.with_overrides(["run.tracking_uri=http://127.0.0.1:9"]))
    missing = cfg.to_dict()["data"]["train"][0] | {"path": str(tmp_path / "nowhere")}
    with pytest.raises(ConfigError, match=r"data.train\[0\].path: .*nowhere"):
        fit(cfg.with_overrides({"data.train": [missing]}))
    with pytest.raises(ConfigError, match="model.init_from"):
        fit(cfg.with_overrides([f"model.init_from={tmp_path}"]))
    assert not (tmp_path / "bad").exists()
