"""The `hint` CLI: help everywhere, resolved configs, and user mistakes as one clear line."""

import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hint_platform.cli import COMMAND_MODULES, main

REPO = Path(__file__).resolve().parent.parent
CONFIG = str(REPO / "hint_platform" / "configs" / "paper" / "hint-3b-sni-def.yaml")


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv", [[], *[[name] for name in COMMAND_MODULES],
                                  ["registry", "list"], ["registry", "alias"], ["registry", "load"],
                                  ["data", "prepare"], ["data", "stats"]])
def test_help_on_every_command(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    assert "usage: hint" in capsys.readouterr().out


def test_train_dry_run_prints_the_resolved_config(capsys):
    code, out, _ = run(capsys, "train", CONFIG, "train.max_steps=5", "model.variant=concat", "--dry-run")
    resolved = yaml.safe_load(out)
    assert code == 0
    assert resolved["train"]["max_steps"] == 5 and resolved["model"]["variant"] == "concat"
    assert resolved["train"]["global_batch_size"] == 1024


def test_overrides_may_come_before_the_config(capsys):
    code, out, _ = run(capsys, "train", "train.max_steps=5", "--dry-run", CONFIG, "model.variant=concat")
    assert code == 0
    assert "max_steps: 5" in out and "variant: concat" in out


def test_dry_run_and_errors_show_no_password(capsys):
    secret = "dry-run-pw-0123"
    code, out, _ = run(capsys, "train", CONFIG, f"run.tracking_uri=http://hint:{secret}@127.0.0.1:9",
                       "--dry-run")
    assert code == 0 and secret not in out
    assert yaml.safe_load(out)["run"]["tracking_uri"] == "http://hint:***@127.0.0.1:9"
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    code, out, err = run(capsys, "registry", "list", "--tracking-uri", f"http://hint:{secret}@127.0.0.1:{port}")
    assert code == 2 and f"http://hint:***@127.0.0.1:{port}" in err and secret not in out + err


def test_console_script_dry_run():
    hint = Path(sys.executable).with_name("hint")
    out = subprocess.run([str(hint), "train", CONFIG, "--dry-run"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout)["name"] == "hint-3b-sni-def"


def test_dry_run_checks_the_model_section_in_one_line(capsys):
    code, _, err = run(capsys, "train", CONFIG, "model.variant=typo", "--dry-run")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert err.startswith("hint train: error: model: unknown variant 'typo'; valid: hint, ")
    code, _, err = run(capsys, "train", CONFIG, "--dry-run", "model.overrides.max_hyper_len=512")
    assert code == 2 and ("data.max_hyper_len: 1024 tokens of instruction, more than the model "
                          "reads (HintConfig.max_hyper_len=512)") in err


def test_dry_run_from_another_directory_notes_what_is_not_there_yet(tmp_path, monkeypatch, capsys):
    """A shipped config by name, from a directory without its data, an option before an
    override: its relative paths are the user directory's; what an earlier stage writes is a
    note in a dry run, and an error naming the path (before Ray starts) in a real one."""
    monkeypatch.chdir(tmp_path)
    code, out, _ = run(capsys, "train", "paper/hint-3b-sni-def", "--dry-run", "train.max_steps=5")
    assert code == 0
    resolved = yaml.safe_load(out)
    assert resolved["train"]["max_steps"] == 5
    assert resolved["run"]["storage_path"] == f"{tmp_path}/runs"
    notes = [line.split(": ", 2)[2] for line in out.splitlines() if line.startswith("# note")]
    assert notes == [f"data.train[0].path: {tmp_path}/data/natural-instructions",
                     f"data.eval[0].path: {tmp_path}/data/natural-instructions",
                     f"model.init_from: {tmp_path}/runs/hint-3b-pretrain-c4/export",
                     f"data.tokenizer: {tmp_path}/runs/hint-3b-pretrain-c4/export"]
    code, _, err = run(capsys, "train", "paper/hint-3b-sni-def", "train.max_steps=5")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert f"data.train[0].path: {tmp_path}/data/natural-instructions does not exist" in err
    assert not (tmp_path / "runs").exists()


def test_dry_run_of_a_stage_from_an_export_of_another_variant(tmp_path, shared_data, capsys):
    """The tokenizer is found in the export; loading it into another variant is checked (on
    shapes, without reading weights) and what it drops is said; another shape is refused."""
    from hint_model import HintConfig, HintModel
    from hint_platform import export

    directory = tmp_path / "export"
    export.write(HintModel(HintConfig.preset("tiny", vocab_size=64)), directory,
                 shared_data / "tokenizer" / "t5")
    stage = [CONFIG, "model.preset=tiny", f"model.init_from={directory}", "data.tokenizer=",
             "model.variant=adapters_only", "--dry-run"]
    code, out, _ = run(capsys, "train", *stage)
    assert code == 0
    assert yaml.safe_load(out)["data"]["tokenizer"] == str(directory / "tokenizer")
    assert ("# note: model.init_from: a 'hint' export loaded as 'adapters_only': dropped 6 "
            "tensor(s): generator.embeddings.prefix_key, ") in out
    code, _, err = run(capsys, "train", *stage, "model.overrides.adapter_size=16")
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "model.init_from: " in err and "generator.embeddings.adapter_down has shape" in err


@pytest.mark.parametrize("override,expected", [
    ("train.max_stepz=5", ["train.max_stepz", "max_steps", "micro_batch_size"]),
    ("trian.max_steps=5", ["trian.max_steps", "train", "model"]),
    ("train.optimizer=sgd", ["train.optimizer", "'sgd'", "adafactor, adamw"]),
    ("train.max_steps=many", ["train.max_steps", "expected an integer", "'many'"]),
    ("train.global_batch_size=1000", ["train.global_batch_size", "multiple"]),
])
def test_config_mistakes_name_the_key_and_what_is_valid(override, expected, capsys):
    code, _, err = run(capsys, "train", CONFIG, override, "--dry-run")
    assert code == 2
    assert err.startswith("hint train: error:") and len(err.strip().splitlines()) == 1
    for fragment in expected:
        assert fragment in err


def test_unknown_key_in_the_config_file_names_file_and_key(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text(Path(CONFIG).read_text().replace("max_steps:", "max_step:"))
    code, _, err = run(capsys, "train", str(bad), "--dry-run")
    assert code == 2 and "bad.yaml" in err and "train.max_step" in err and "max_steps" in err
    code, _, err = run(capsys, "train", str(tmp_path / "missing.yaml"), "--dry-run")
    assert code == 2 and "config file not found" in err and "missing.yaml" in err


def test_unreachable_tracking_server_fails_fast_naming_the_uri(capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    code, _, err = run(capsys, "registry", "list", "--tracking-uri", uri)
    assert code == 2 and uri in err and "unreachable" in err


def test_eval_of_something_that_is_not_a_model(tmp_path, capsys):
    code, _, err = run(capsys, "eval", str(tmp_path), CONFIG, "--no-mlflow")
    assert code == 2 and "not a model export directory" in err and str(tmp_path) in err


def test_flops_table(capsys):
    """The figures, not the header: concatenation pays the instruction with every input, so its
    cost is linear in n and HINT's advantage grows with n."""
    from hint_model import HintConfig
    from hint_model.flops import task_cost

    code, out, _ = run(capsys, "flops", "--preset", "xl", "--instruction-len", "256", "--input-len", "128",
                       "--output-len", "32", "--num-inputs", "1", "10", "100")
    assert code == 0
    rows = {int(line.split()[0]): [float(x) for x in line.split()[1:]]
            for line in out.splitlines() if line.split() and line.split()[0].isdigit()}
    assert sorted(rows) == [1, 10, 100]
    assert rows[10][1] == pytest.approx(10 * rows[1][1], rel=1e-3)  # concat: linear in n
    assert rows[1][2] < rows[10][2] < rows[100][2] and rows[100][2] > 1.5
    expected = task_cost(HintConfig.preset("xl"), 100, 256, 128, 32)
    assert rows[100][:2] == pytest.approx([expected.hint / 1e9, expected.concat / 1e9], abs=0.01)


def test_data_prepare_then_stats(tmp_path, capsys):
    from pipelines import train_tokenizer, write_suite

    suite = write_suite(tmp_path / "data", num_train_tasks=21, num_test_tasks=2, instances_per_task=4,
                        num_pretrain_docs=5)
    train_tokenizer(suite.texts(), tmp_path / "tok", vocab_size=200)
    demo = str(REPO / "hint_platform" / "configs" / "demo" / "finetune.yaml")
    spec = yaml.safe_dump(suite.sni_spec(), default_flow_style=True).strip()
    code, out, _ = run(capsys, "data", "prepare", demo, f"data.train=[{spec}]",
                       f"data.tokenizer={tmp_path / 'tok'}", "--out", str(tmp_path / "prepared"))
    assert code == 0, out
    assert f"{21 * 4} examples in 1 shard(s), 21 task(s)" in out
    assert sorted(p.name for p in (tmp_path / "prepared").iterdir()) == ["manifest.json", "shard-00000.parquet"]
    code, out, _ = run(capsys, "data", "stats", str(tmp_path / "prepared"))
    assert code == 0 and f"{21 * 4} examples" in out and "instruction" in out
    code, _, err = run(capsys, "data", "stats", str(tmp_path))
    assert code == 2 and "no manifest.json" in err


def test_eval_an_export_on_held_out_tasks(tmp_path, capsys, ray_local):
    import json

    from hint_model import HintConfig, HintModel
    from hint_platform.export import write as write_export
    from pipelines import train_tokenizer, write_suite

    suite = write_suite(tmp_path / "data", num_train_tasks=21, num_test_tasks=2, instances_per_task=3,
                        num_pretrain_docs=5)
    tok = train_tokenizer(suite.texts(), tmp_path / "tok", vocab_size=200)
    export = tmp_path / "export"
    write_export(HintModel(HintConfig.preset("tiny", vocab_size=tok.vocab_size)), export, tmp_path / "tok")
    spec = yaml.safe_dump(suite.sni_spec(part="test"), default_flow_style=True).strip()
    code, out, _ = run(capsys, "eval", str(export), str(REPO / "hint_platform" / "configs" / "demo" / "finetune.yaml"),
                       f"data.eval=[{spec}]", "--no-mlflow", "--max-new-tokens", "4", "--out", str(tmp_path / "ev"))
    assert code == 0
    assert "overall" in out and "rougeL" in out
    predictions = [json.loads(line) for line in (tmp_path / "ev" / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 2 * 3 and {p["task"] for p in predictions} == set(suite.test_tasks)
    metrics = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert set(metrics["per_task"]) == set(suite.test_tasks) and metrics["overall"]["gflops_per_task"] > 0


def test_configs_lists_and_prints_the_shipped_configs(capsys, tmp_path, monkeypatch):
    code, out, _ = run(capsys, "configs")
    assert code == 0 and {"demo/finetune", "paper/hint-3b-sni-def"} <= set(out.split())
    monkeypatch.chdir(tmp_path)  # found through the package, from any directory
    code, out, _ = run(capsys, "configs", "demo/finetune")
    assert code == 0 and yaml.safe_load(out)["name"] == "demo-finetune"
    code, _, err = run(capsys, "configs", "demo/finetun")
    assert code == 2 and "config file not found: demo/finetun" in err


@pytest.mark.parametrize(("name", "parameters"), [("paper/gpt2-xl-sni-def", 1_557_611_200),
                                                  ("paper/opt-13b-sni-def", 12_853_473_280)])
def test_dry_run_memory_counts_the_configured_optimizer(name, parameters, capsys):
    """The decoder-only baselines train with AdamW: two fp32 moments per trained parameter,
    8 N / W bytes per GPU (Adafactor's factored moment would be a few MiB at these sizes)."""
    code, out, _ = run(capsys, "train", name, "--dry-run")
    assert code == 0
    line = next(line for line in out.splitlines() if line.startswith("# memory per GPU"))
    assert "AdamW" in line and "Adafactor" not in line
    optimizer_gib = float(line.split("optimizer ")[1].split()[0])
    assert optimizer_gib == pytest.approx(8 * parameters / 8 / 2 ** 30, abs=0.01)
