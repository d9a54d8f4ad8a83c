"""`hint adapter`: a task of a lora_only Llama export as a PEFT adapter, run as a user runs it
(another directory, relative paths, a real SNI task file), loaded by `peft.PeftModel` over the
base (transformers' own Llama) with the HINT model's logits; its provenance in the directory and,
for a registered model, as a tag on the MLflow run that logged it; each bad input refused in one
line before anything is written."""

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hint_model import HintConfig, HintModel
from hint_model.peft_export import PROVENANCE, adapter_nbytes, instruction_sha256
from hint_platform import cli, export
from hint_platform.serving import adapter
from hint_platform.serving.predictor import CachedPredictor
from hint_platform.tracking import registry
from hint_platform.tracking.runs import mlflow_client
from pipelines import formats, iter_records
from tests.tiny_decoders import (assert_peft_runs_the_task_as_hint, lora_only_llama, save_tiny_decoder,
                                 sni_texts)

REPO = Path(__file__).resolve().parent.parent
MAX_HYPER = 512


@pytest.fixture(scope="module")
def llama(shared_data, tmp_path_factory):
    """(the lora_only export, its Hugging Face base, a real SNI task file)."""
    root = tmp_path_factory.mktemp("adapter")
    out, base = lora_only_llama(sni_texts(shared_data / "sni"), root, max_hyper_len=MAX_HYPER)
    task = shared_data / "sni" / "tasks" / "task665_mmmlu_answer_generation_anatomy.json"  # a short definition
    return out, base, task


def hint_adapter(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "hint_platform.cli", "adapter", *args], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=300)


def test_a_task_file_becomes_an_adapter_peft_loads_and_a_second_run_is_refused(llama, tmp_path):
    out, base, task = llama
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    rel = lambda p: os.path.relpath(p, elsewhere)  # noqa: E731
    done = hint_adapter(rel(out), "--output", "adapters/task", "--task", rel(task),
                        "--base", rel(base), "--base-revision", "r1", cwd=elsewhere)
    assert done.returncode == 0, done.stderr
    adapter = elsewhere / "adapters" / "task"
    assert sorted(p.name for p in adapter.iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors", PROVENANCE]
    assert f"--lora-modules {task.stem}={adapter}" in done.stdout
    assert "--max-lora-rank 8" in done.stdout and f"--lora-paths {task.stem}={adapter}" in done.stdout

    definition = json.loads(task.read_text())["Definition"][0].strip()  # the 'def' format's text
    provenance = json.loads((adapter / PROVENANCE).read_text())
    assert provenance == {"base_model_name_or_path": str(base), "task": task.stem, "format": "def",
                          "instruction_sha256": instruction_sha256(definition),
                          "model": str(out), "base_revision": "r1"}
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert_peft_runs_the_task_as_hint(out, base, adapter, definition)

    before = (adapter / "adapter_model.safetensors").read_bytes()
    again = hint_adapter(rel(out), "--instruction", "Say yes.", "--output", "adapters/task", cwd=elsewhere)
    assert again.returncode == 2
    assert again.stderr.strip() == ("hint adapter: error: --output adapters/task: exists and is not "
                                    "an empty directory")
    assert (adapter / "adapter_model.safetensors").read_bytes() == before


def test_a_task_in_def_pos_format_gives_the_definition_and_positive_examples_as_training_does(
        llama, tmp_path, monkeypatch):
    out, base, task = llama
    monkeypatch.chdir(tmp_path)
    assert cli.main(["adapter", os.path.relpath(out), "--format", "def_pos", "--output", "a",
                     "--task", os.path.relpath(task)]) == 0
    data = json.loads(task.read_text())
    # what the SNI reader gives the hypernetwork in training for format def_pos, num_pos 2
    text = formats.sni_def_pos_hyper(data["Definition"][0], data["Positive Examples"], 2, lambda t: True)
    assert text.startswith(" Positive Example 2 -") and "Positive Example 1 -" in text
    provenance = json.loads((tmp_path / "a" / PROVENANCE).read_text())
    assert provenance["instruction_sha256"] == instruction_sha256(text)
    assert provenance["format"] == "def_pos:2"
    assert_peft_runs_the_task_as_hint(out, base, tmp_path / "a", text)

    assert cli.main(["adapter", str(out), "--task", str(task), "--format", "def_pos", "--positives", "1",
                     "--output", "b"]) == 0
    one = formats.sni_def_pos_hyper(data["Definition"][0], data["Positive Examples"], 1, lambda t: True)
    assert json.loads((tmp_path / "b" / PROVENANCE).read_text())["instruction_sha256"] == instruction_sha256(one)

    # The hypernetwork reads the text's tokens as the SNI reader gives them in training, the
    # leading space of " Positive Example 2" included (this byte-level BPE has a token for it).
    checkout = tmp_path / "sni"
    (checkout / "tasks").mkdir(parents=True)
    (checkout / "tasks" / task.name).symlink_to(task)
    (checkout / "splits" / "one").mkdir(parents=True)
    (checkout / "splits" / "one" / "train_tasks.txt").write_text(task.stem + "\n")
    (trained,) = itertools.islice(iter_records(
        [{"kind": "sni", "path": str(checkout), "split": "one", "format": "def_pos"}],
        str(export.tokenizer_dir(out)), max_hyper_len=MAX_HYPER, causal=True), 1)
    assert list(CachedPredictor(str(out), cache_mib=0).reader.task_key(text)) == trained["hyper_input_ids"]


def test_a_registered_model_tags_the_run_that_logged_it(llama, tmp_path, monkeypatch):
    out, base, _ = llama
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    logged = registry.log_and_register(out, tracking_uri=uri, name="lora-llama")
    registry.set_alias(uri, "lora-llama", "champion", 1)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["adapter", "models:/lora-llama@champion", "--instruction", "Answer yes or no.",
                     "--output", "a", "--name", "yes-no", "--tracking-uri", uri]) == 0
    provenance = json.loads((tmp_path / "a" / PROVENANCE).read_text())
    sha = instruction_sha256("Answer yes or no.")
    # without --base: the base the model was built from, as its export records it
    assert provenance == {"base_model_name_or_path": str(base), "task": "yes-no", "instruction_sha256": sha,
                          "model": "models:/lora-llama@champion", "registered_name": "lora-llama",
                          "registered_version": "1", "run_id": logged["run_id"]}
    with mlflow_client(uri) as client:
        tags = client.get_run(logged["run_id"]).data.tags
    assert tags[f"hint.adapter.{sha[:12]}"] == str(tmp_path / "a")


@pytest.fixture(scope="module")
def bad_models(llama, tmp_path_factory):
    """Models `hint adapter` refuses: a `hint` Llama (prefixes, adapters, fusion) and a T5; and
    a Llama base whose value projections are wider than the export's (no grouped-query)."""
    _, base, _ = llama
    root = tmp_path_factory.mktemp("bad")
    hint = export.write(HintModel.from_hf_checkpoint(base, variant="hint"), root / "hint", base)
    t5 = export.write(HintModel(HintConfig.preset("tiny", variant="lora_only", vocab_size=400)),
                      root / "t5", base)
    wide = root / "wide-base"
    save_tiny_decoder("llama", wide, num_key_value_heads=4)
    return {"hint": hint, "t5": t5, "wide": wide}


@pytest.mark.parametrize("case, message", [
    ("variant", "variant 'hint' cannot be a PEFT LoRA adapter: it uses adapters and prefixes and "
                "instruction fusion, which a LoRA cannot hold (vLLM removed prompt adapters)"),
    ("t5", "a t5 model has no causal-LM PEFT adapter"),
    ("too long", f"more than the model's max_hyper_len={MAX_HYPER}"),
    ("long positives", f"more than the model's max_hyper_len={MAX_HYPER}"),
    ("format without task", "--format def_pos: formats a --task file; --instruction is used as given"),
    ("base", "v_proj.weight is [64, 64], the adapter's lora_targets ['q', 'v'] of a 2-layer model "
             "need [32, 64]"),
    ("output", "--output full: exists and is not an empty directory"),
    ("no model", "missing-export: not a model export directory nor a models:/ URI"),
    ("no task", "--task missing.json: no such file"),
])
def test_bad_input_is_one_line_naming_it(llama, bad_models, tmp_path, monkeypatch, capsys, case, message):
    out, base, task = llama
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("x")
    args = {"variant": [str(bad_models["hint"]), "--instruction", "Say yes."],
            "t5": [str(bad_models["t5"]), "--instruction", "Say yes."],
            "too long": [str(out), "--instruction", "word " * 2000],
            "long positives": [str(out), "--task", str(task.with_name("task1290_xsum_summarization.json")),
                               "--format", "def_pos"],  # its definition alone fits
            "format without task": [str(out), "--instruction", "Say yes.", "--format", "def_pos"],
            "base": [str(out), "--task", str(task), "--base", str(bad_models["wide"])],
            "output": [str(out), "--instruction", "Say yes.", "--output", "full"],
            "no model": ["missing-export", "--instruction", "Say yes."],
            "no task": [str(out), "--task", "missing.json"]}[case]
    if "--output" not in args:
        args += ["--output", "adapter"]
    assert cli.main(["adapter", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and err.startswith("hint adapter: error: "), err
    assert not (tmp_path / "adapter").exists() and os.listdir(tmp_path) == ["full"]


def test_a_server_refuses_an_adapter_over_its_size_bound_before_any_work(llama):
    cfg = export.model_config(llama[0])
    exact = 4 * 2 * (8 * 64 + 64 * 8 + 8 * 64 + 32 * 8)  # fp32 x 2 layers x (A, B of q; A, B of v)
    assert adapter_nbytes(cfg) == exact
    adapter.check(cfg, max_bytes=exact)
    with pytest.raises(adapter.NotExportable, match=r"the adapter would be 0.0 MiB, more than this "
                                                    r"server's .* MiB \(--max-adapter-mib\)"):
        adapter.check(cfg, max_bytes=exact - 1)


def test_a_base_in_a_hugging_face_cache_gives_its_snapshot_as_the_revision(llama, tmp_path, monkeypatch):
    out, base, _ = llama
    snapshots = tmp_path / "hub" / "models--org--tiny" / "snapshots"
    snapshots.mkdir(parents=True)
    (snapshots / "0123abcd").symlink_to(base)
    monkeypatch.chdir(tmp_path)
    assert cli.main(["adapter", str(out), "--instruction", "Say yes.", "--output", "a",
                     "--base", "hub/models--org--tiny/snapshots/0123abcd"]) == 0
    provenance = json.loads((tmp_path / "a" / PROVENANCE).read_text())
    assert provenance["base_revision"] == "0123abcd"
    assert provenance["base_model_name_or_path"] == str(snapshots / "0123abcd")
