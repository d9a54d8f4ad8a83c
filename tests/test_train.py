"""Training on real Ray workers: 2-worker FSDP against a plain single-process loop, a run
restarted and a worker killed mid-run against an uninterrupted reference, evaluation loss,
skipped bad records, MLflow contents, the export, and the errors a user meets first. Tiny
model, synthetic suite, few steps."""

from __future__ import annotations

import os
import shutil
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

from hint_platform import export
from hint_platform.training.checkpoint import TRAIN_STATE
from hint_platform.config import ConfigError, from_dict
from hint_platform.training.optim import build_optimizer
from hint_platform.tracking.runs import TrackingError, resolve_tracking_uri
from hint_platform.errors import DataError, TrainingError
from hint_platform.training.driver import fit
from hint_platform.training.worker import build_model, train_step
from pipelines import iter_records, train_tokenizer, write_suite
from pipelines.collate import collate

# The kill callback runs in the Train controller, which cannot import this test module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

LENGTHS = dict(max_input_len=32, max_hyper_len=48, max_target_len=16)


@pytest.fixture(scope="module")
def corrupt_sni(suite, tmp_path_factory):
    """The suite's SNI checkout plus one training task whose file is not valid JSON."""
    s, _ = suite
    root = tmp_path_factory.mktemp("corrupt") / "sni"
    shutil.copytree(s.sni_path, root)
    (root / "tasks" / "broken.json").write_text('{"Definition": ["Reverse the items."],\n"Inst')
    with open(root / "splits" / "synthetic" / "train_tasks.txt", "a") as f:
        f.write("broken\n")
    return str(root)


def make_cfg(suite, storage, name, *, per_task, data=(), **train):
    s, tok = suite
    return from_dict({
        "name": name,
        "data": {"tokenizer": tok, "train": [s.sni_spec("def", max_per_task=per_task)], **LENGTHS,
                 **dict(data)},
        "train": {"micro_batch_size": 4, "log_every": 1, "lr": 1e-2, **train},
        "run": {"storage_path": str(storage)},
    })


def records(cfg, specs, epoch: int = 0) -> list[dict]:
    d = cfg.data
    return list(iter_records(specs, d.tokenizer, max_input_len=d.max_input_len,
                             max_hyper_len=d.max_hyper_len, max_target_len=d.max_target_len,
                             on_bad_record=d.on_bad_record, epoch=epoch))


def reference_losses(cfg, steps: int) -> tuple[list[float], dict[int, float], torch.nn.Module]:
    """The same training as a plain loop in this process: rows in stream order, pass after
    pass (each its own shuffle), `global_batch_size` rows a step, one micro-batch at a time.
    Also the evaluation losses by step (every eval_every steps and at the end): the model's own
    mean loss over the first eval_examples rows of data.eval."""
    passes = [records(cfg, cfg.data.train, epoch) for epoch in range(steps)]
    evaluation = records(cfg, cfg.data.eval)[:cfg.train.eval_examples] if cfg.data.eval else []
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg)
    optimizer = build_optimizer(model, cfg.train)
    g, m, every = cfg.train.global_batch_size, cfg.train.micro_batch_size, cfg.train.eval_every
    per_epoch = len(passes[0]) // g
    losses, evals = [], {}
    for step in range(1, steps + 1):
        epoch, k = divmod(step - 1, per_epoch)
        batch = passes[epoch][k * g:(k + 1) * g]
        micro = [collate(batch[i:i + m]) for i in range(0, g, m)]
        out = train_step(model, optimizer, micro, cfg.train.grad_clip, cfg.train.z_loss)
        losses.append(float(out["loss"]))
        if evaluation and (step == steps or (every and step % every == 0)):
            with torch.no_grad():
                evals[step] = model.eval()(**collate(evaluation)).loss.item()
            model.train()
    return losses, evals, model


def metric_history(result, key: str = "loss") -> list[tuple[int, float]]:
    uri = f"sqlite:///{Path(result.run_dir).parent / 'mlflow.db'}"
    history = MlflowClient(tracking_uri=uri).get_metric_history(result.mlflow_run_id, key)
    return sorted((m.step, m.value) for m in history)


def final_train_state(result) -> dict:
    return load_file(str(Path(result.checkpoint_path) / TRAIN_STATE))


class KillWorkerAfter(UserCallback):
    """On the Train controller: SIGKILLs the last Train worker process once, after the report
    of `step` (the controller and the workers are children of the same raylet), and writes the
    killed pid to `record`."""

    def __init__(self, step: int, record: Path):
        self.step = step
        self.record = record
        self.done = False

    def after_report(self, run_context, metrics, checkpoint):
        if self.done or metrics[0].get("step") != self.step:
            return
        workers = [p for p in psutil.Process(os.getppid()).children()
                   if "RayTrainWorker" in " ".join(p.cmdline())]
        os.kill(workers[-1].pid, signal.SIGKILL)
        self.record.write_text(str(workers[-1].pid))
        self.done = True


@pytest.fixture(scope="module")
def fsdp_run(suite, corrupt_sni, ray_local, tmp_path_factory):
    """2 workers, FSDP; a pass of the training data (24 examples, one corrupt task file
    skipped; each pass draws another instance of each task) is exactly one global batch, so
    every step trains on its pass's examples however the workers split them. Rank 1 is SIGKILLed after step 3 and the run resumes from the step-2
    checkpoint. Evaluation every 2 steps on 4 examples: one micro-batch for two ranks."""
    s, _ = suite
    runs = tmp_path_factory.mktemp("runs")
    data = {"train": [s.sni_spec("def", max_per_task=1) | {"path": corrupt_sni}],
            "on_bad_record": "skip", "eval": [s.sni_spec("def", part="test")]}
    cfg = make_cfg(suite, runs, "fsdp", per_task=1, data=data, num_workers=2,
                   global_batch_size=24, max_steps=4, checkpoint_every=2, max_failures=1,
                   eval_every=2, eval_examples=4)
    killed = runs / "killed"
    return cfg, fit(cfg, run_config_callbacks=[KillWorkerAfter(step=3, record=killed)]), killed


def test_fsdp_matches_one_process_through_a_killed_worker(fsdp_run):
    cfg, result, killed = fsdp_run
    history = metric_history(result)
    expected, expected_evals, model = reference_losses(cfg, 4)
    assert result.steps_done == 4
    assert killed.exists()  # step 3 ran, the worker died, step 3 ran again ...
    assert [s for s, _ in history] == [1, 2, 3, 4]  # ... and MLflow holds it once
    for step, value in history:
        assert value == pytest.approx(expected[step - 1], rel=1e-4), step
    assert expected[-1] < expected[0] - 1.0  # and the loss falls
    evals = metric_history(result, "eval_loss")
    assert [s for s, _ in evals] == [2, 4]
    for step, value in evals:
        assert value == pytest.approx(expected_evals[step], rel=1e-4), step
    assert result.metrics["step"] == 4  # reported with the step (what Tune's ASHA reads)
    assert result.metrics["eval_loss"] == pytest.approx(expected_evals[4], rel=1e-4)
    exported = load_file(str(Path(result.export_dir) / "model.safetensors"))
    for name, value in model.state_dict().items():
        torch.testing.assert_close(exported[name], value, rtol=1e-3, atol=1e-5)
    assert export.data_format(result.export_dir) == export.DataFormat("sni", True, ("def",))  # data.train's


def test_skipped_bad_records_are_in_the_run_metrics(fsdp_run):
    _, result, _ = fsdp_run
    assert result.metrics["data_bad_records_skipped"] == 1
    assert [v for _, v in metric_history(result, "data_bad_records_skipped")] == [1] * 4


def test_bad_record_fails_the_run_naming_the_file(suite, corrupt_sni, ray_local, tmp_path):
    s, _ = suite
    data = {"train": [s.sni_spec("def", max_per_task=1) | {"path": corrupt_sni}]}
    cfg = make_cfg(suite, tmp_path, "bad-record", per_task=1, data=data, fsdp=False,
                   global_batch_size=4, max_steps=1, max_failures=0)
    with pytest.raises(DataError, match=r"broken\.json.*on_bad_record: skip"):
        fit(cfg)


def test_mlflow_run_holds_params_metrics_artifacts(fsdp_run):
    cfg, result, _ = fsdp_run
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
    second, having resumed mid-epoch). Evaluated only at the end of each (eval_every=0)."""
    s, _ = suite
    first = make_cfg(suite, tmp_path, "resume", per_task=2, num_workers=1,
                     global_batch_size=8, max_steps=4, checkpoint_every=2,
                     data={"eval": [s.sni_spec("def", part="test")]}, eval_examples=4)
    fit(first)
    result = fit(first.with_overrides(["train.max_steps=8"]))
    assert result.steps_done == 8
    expected, _, _ = reference_losses(first, 8)
    history = metric_history(result)
    assert [s for s, _ in history] == list(range(1, 9))
    assert [v for _, v in history] == pytest.approx(expected, rel=1e-4)
    assert [s for s, _ in metric_history(result, "eval_loss")] == [4, 8]
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
    no_match = missing | {"path": str(tmp_path / "c4-*.json.gz")}
    with pytest.raises(ConfigError, match=r"data.train\[0\].path: .*c4-\*.json.gz matches no file"):
        fit(cfg.with_overrides({"data.train": [no_match]}))
    with pytest.raises(ConfigError, match="model.init_from"):
        fit(cfg.with_overrides([f"model.init_from={tmp_path}"]))
    assert not (tmp_path / "bad").exists()


def test_a_glob_that_matches_is_a_valid_data_path(suite, tmp_path, monkeypatch):
    """The paper's C4 configs name shards by glob: it is checked by what it matches, and made
    absolute for the workers without being expanded."""
    from hint_platform.training.driver import resolve

    c4 = Path(suite[0].c4_path)
    monkeypatch.chdir(c4.parent)
    spec = suite[0].c4_spec() | {"path": "*" + c4.name[1:]}
    cfg = make_cfg(suite, tmp_path, "glob", per_task=1, max_steps=1, data={"train": [spec]})
    assert resolve(cfg).data.train[0]["path"] == str(c4.parent / spec["path"])


def test_a_micro_batch_too_big_for_memory_is_a_clear_error(ray_local, tmp_path):
    """A real allocation failure, not a simulated one: 8192 concatenation-format examples
    (padded to 27 tokens) through a 65536-wide embedding ask the allocator for 54 GiB at the
    first step, which the kernel refuses outright (nothing is touched). The run fails naming
    the setting to lower, and its MLflow run is marked FAILED."""
    would_need = 8192 * 27 * 65536 * 4
    try:
        torch.empty(would_need, dtype=torch.uint8)
        pytest.skip(f"this machine grants {would_need / 2**30:.0f} GiB of address space at once: "
                    "the batch would really fill memory instead of failing to allocate")
    except RuntimeError:
        pass
    s = write_suite(tmp_path / "suite", num_train_tasks=15, num_test_tasks=2, instances_per_task=550,
                    num_pretrain_docs=4)
    train_tokenizer(s.texts(), tmp_path / "tok", vocab_size=200)
    cfg = from_dict({
        "name": "oom",
        "model": {"variant": "concat", "overrides": {"d_model": 65536, "d_kv": 4, "num_heads": 1, "d_ff": 4,
                                                      "num_layers": 1, "num_decoder_layers": 1}},
        "data": {"tokenizer": str(tmp_path / "tok"), "train": [s.sni_spec("concat", max_per_task=550)], **LENGTHS,
                 "max_input_len": 64},
        "train": {"num_workers": 1, "micro_batch_size": 8192, "global_batch_size": 8192, "max_steps": 1,
                  "max_failures": 0},
        "run": {"storage_path": str(tmp_path)},
    })
    with pytest.raises(TrainingError, match=r"out of memory at train.micro_batch_size=8192 on cpu: "
                                            r"lower train.micro_batch_size"):
        fit(cfg)
    client = MlflowClient(resolve_tracking_uri(cfg))
    (run,) = client.search_runs([client.get_experiment_by_name(cfg.run.experiment).experiment_id])
    assert run.info.status == "FAILED"
