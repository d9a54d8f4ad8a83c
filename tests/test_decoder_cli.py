"""The decoder-only path through the `hint` CLI, once, as a user runs it from their own directory
with relative paths (issues 19 and 20): a tiny random GPT-2 in a local Hugging Face directory,
its tokenizer.json trained here, the real SNI and C4 samples, the session's Ray, and MLflow's
store where `hint` puts it by default (runs/mlflow.db, which `hint predict` finds too).

- The concat baseline (Appendix D: AdamW, linear warmup and decay): `hint train`, then the same
  command with more steps resumes the run (same name and storage); each run registers its export;
  `hint eval` and `hint predict` of the registered version.
- HINT on the GPT-2 base (issue 20): C4 pretraining (x1 to the hypernetwork, the model continues
  x2 with x3), then SNI fine-tuning from its export, registered, evaluated and predicted; then
  lora_only with the base frozen (Text-to-LoRA's setup) fine-tuned from the same export (the
  other variants' training steps: tests/test_model_decoder_hint.py).

What tests/test_train_decoder.py shows (the causal loss, FSDP gradients) is not repeated here.
"""

import contextlib
import io
import json
import time

import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient
from safetensors.torch import load_file

from hint_platform import cli
from tests.tiny_decoders import save_tiny_decoder, sni_texts, train_byte_bpe

SNI = {"kind": "sni", "path": "data/sni", "split": "mini", "max_per_task": 1}
C4 = {"kind": "c4", "path": "data/c4/c4-en.olmo-test-fixtures.json.gz", "format": "pretrain",
      "segment_len": 48}
HYPER = {"adapter_size": 4, "prefix_length": 2, "lora_rank": 4, "generator_mlp_dim": 16}


def run_cli(*args: str) -> tuple[int, str]:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        code = cli.main(list(args))
    return code, out.getvalue()


def summary(output: str) -> dict[str, str]:
    return dict(line.split(": ", 1) for line in output.splitlines() if ": " in line and not line.startswith(" "))


def stage(name: str, variant: str, init_from: str, fmt: str, **train) -> dict:
    """A training stage of the chain at toy size; `fmt` "c4": pretraining, else the SNI format."""
    sources = [C4] if fmt == "c4" else [{**SNI, "format": fmt}]
    return {
        "name": name,
        "model": {"preset": "gpt2-xl", "variant": variant, "init_from": init_from,
                  "overrides": HYPER if variant not in ("concat", "no_instruct") else {}},
        "data": {"tokenizer": "gpt2", "train": sources,
                 "eval": [] if fmt == "c4" else [{**SNI, "format": fmt, "part": "test"}],
                 "max_input_len": 96, "max_hyper_len": 96, "max_target_len": 8 if fmt != "c4" else 48},
        "train": {"num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": 4, "micro_batch_size": 4,
                  "max_steps": 1, "optimizer": "adamw", "lr": 1e-3, "lr_schedule": "linear",
                  "warmup_steps": 1, "z_loss": 0.0, "checkpoint_every": 1, "log_every": 1,
                  "eval_examples": 2, **train},
        "run": {"storage_path": "runs", "experiment": "decoder-cli"},
    }


@pytest.fixture(scope="module")
def chain(ray_local, shared_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("user")
    (root / "data").symlink_to(shared_data)
    train_byte_bpe(sni_texts(shared_data / "sni"), root / "gpt2", "gpt2")
    save_tiny_decoder("gpt2", root / "gpt2", positions=256)
    configs = {
        "concat": stage("gpt2-concat", "concat", "gpt2", "concat", max_steps=2),
        "c4": stage("gpt2-hint-c4", "hint", "gpt2", "c4"),
        "hint": stage("gpt2-hint", "hint", "runs/gpt2-hint-c4/export", "def"),
    }
    configs["concat"]["run"]["register_as"] = "gpt2-concat"
    configs["hint"]["run"]["register_as"] = "gpt2-hint"
    (root / "rows.jsonl").write_text("".join(json.dumps(row) + "\n" for row in [
        {"id": "a", "instruction": "Answer with the word in the sentence.", "input": "A fox ran."},
        {"id": "b", "instruction": "Answer with the word in the sentence.", "input": "Rain."},
        {"id": "c", "instruction": "Translate the command into actions.", "input": "jump twice"}]))
    outputs, times = {}, {}
    with pytest.MonkeyPatch.context() as env:
        env.delenv("MLFLOW_TRACKING_URI", raising=False)
        env.chdir(root)
        for name, cfg in configs.items():
            (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))

        def step(key: str, *argv: str) -> str:
            start = time.monotonic()
            code, out = run_cli(*argv)
            times[key] = time.monotonic() - start
            assert code == 0, f"hint {' '.join(argv)}:\n{out[-4000:]}"
            outputs[key] = out
            return out

        step("concat", "train", "concat.yaml")
        step("concat-resumed", "train", "concat.yaml", "train.max_steps=3")
        for model, cfg in (("gpt2-concat/2", "concat"), ("gpt2-hint/1", "hint")):
            if cfg == "hint":
                step("c4", "train", "c4.yaml")
                step("hint", "train", "hint.yaml")
            step(f"eval-{cfg}", "eval", f"models:/{model}", f"{cfg}.yaml", "--max-new-tokens=4",
                 "--workers=1", "--cpus-per-worker=0.5", f"--out=eval-{cfg}")
            step(f"predict-{cfg}", "predict", f"models:/{model}", "rows.jsonl", f"--output=predict-{cfg}",
                 "--max-new-tokens=4", "--actor-cpus=0.5")
        step("lora-only-frozen", "train", "hint.yaml", "name=gpt2-lora-only-frozen",
             "model.variant=lora_only", "run.register_as=null", "model.overrides.freeze_underlying=true")
    print("\ndecoder CLI chain (s): " + " ".join(f"{k}={v:.0f}" for k, v in times.items()))
    return {"root": root, "outputs": outputs, "client": MlflowClient(f"sqlite:///{root / 'runs' / 'mlflow.db'}")}


def export(chain, run: str) -> tuple[dict, dict]:
    """The config and the weights of a run's export."""
    directory = chain["root"] / "runs" / run / "export"
    return (json.loads((directory / "config.json").read_text())["config"],
            load_file(directory / "model.safetensors"))


def test_the_baseline_resumes_where_it_stopped_and_each_run_registers(chain):
    first, resumed = (summary(chain["outputs"][key]) for key in ("concat", "concat-resumed"))
    assert (first["steps"], resumed["steps"]) == ("2", "3")
    assert first["mlflow_run_id"] == resumed["mlflow_run_id"]  # the same MLflow run, continued
    assert not (chain["root"] / "mlruns").exists()  # every artifact beside the store, in runs/
    assert (first["registered"], resumed["registered"]) == ("models:/gpt2-concat/1", "models:/gpt2-concat/2")
    history = chain["client"].get_metric_history(first["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == [1, 2, 3]  # no step trained twice
    cfg, _ = export(chain, "gpt2-concat")
    assert (cfg["model_type"], cfg["variant"]) == ("gpt2", "concat")


@pytest.mark.parametrize("model", ["concat", "hint"])
def test_eval_and_predict_take_the_registered_model(chain, model):
    metrics = json.loads((chain["root"] / f"eval-{model}" / "metrics.json").read_text())
    assert 0 <= metrics["overall"]["rougeL"] <= 100
    predictions = pd.read_parquet(chain["root"] / f"predict-{model}" / "predictions.parquet")
    assert sorted(predictions["id"]) == ["a", "b", "c"]
    assert all(isinstance(text, str) for text in predictions["prediction"])


def test_hint_pretrains_on_c4_then_fine_tunes_from_its_export(chain):
    c4, c4_weights = export(chain, "gpt2-hint-c4")
    hint, hint_weights = export(chain, "gpt2-hint")
    for cfg in (c4, hint):
        assert (cfg["model_type"], cfg["variant"]) == ("gpt2", "hint")
        assert cfg["lora"] and cfg["adapters"] and cfg["prefixes"] and cfg["fusion"]
    assert c4_weights.keys() == hint_weights.keys()
    assert any(k.startswith("generator.") for k in hint_weights)
    params = chain["client"].get_run(summary(chain["outputs"]["hint"])["mlflow_run_id"]).data.params
    assert params["model.init_from"].endswith("/runs/gpt2-hint-c4/export")  # the C4 stage's export, resolved


def test_lora_only_fine_tunes_with_the_base_frozen(chain):
    """From the C4 stage's export, Text-to-LoRA's setup (lora_only, freeze_underlying): the base's
    weights are the export's, bit for bit, and only the hypernetwork moved."""
    _, start = export(chain, "gpt2-hint-c4")
    cfg, weights = export(chain, "gpt2-lora-only-frozen")
    assert cfg["lora"] and not (cfg["adapters"] or cfg["prefixes"] or cfg["fusion"])
    assert cfg["freeze_underlying"] is True
    base = [k for k in weights if k.startswith("base.")]
    assert base and all(torch.equal(weights[k], start[k]) for k in base)
    assert not all(torch.equal(weights[k], start[k]) for k in weights if k.startswith("generator."))
