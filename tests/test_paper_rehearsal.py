"""The paper's chains end to end at toy size on the real samples, through the `hint` CLI with only
sizes, steps and paths overridden: a tiny Hugging Face T5 (written here, with the real T5
spiece.model) as the "LM-adapted checkpoint" -> C4 pretraining -> SNI Def and Def + 2 Pos.
fine-tuning and evaluation on the real test tasks -> P3 joint and split on the rendered / raw
files, rank classification on SuperGLUE -> `hint paper table`. Each stage must have consumed the
previous stage's export; a second `hint paper run` must skip everything.

The decoder-only baselines of Table 1 at toy size: a tiny random GPT-2 and a tiny OPT written
here as Hugging Face saves them, each with a byte-level BPE tokenizer trained here, fine-tuned
(`fit`, one point of their sweep) on the real SNI sample, evaluated, in `hint paper table`."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from hint_platform import cli
from hint_platform.paper import plan, runner
from hint_platform.paper.stages import resolve
from hint_platform.tracking import runs
from tests.tiny_decoders import save_tiny_decoder, sni_texts, train_byte_bpe

D_MODEL = 64  # the tiny preset's width: T5's 32k vocabulary makes the embedding the model


@pytest.fixture(scope="module")
def t5_dir(shared_data, tmp_path_factory) -> Path:
    """A tiny T5 v1.1 (gated GELU, untied head) as Hugging Face saves it, with the real T5
    vocabulary: what `checkpoints/t5-xl-lm-adapt` is at full size."""
    from transformers import T5Config, T5ForConditionalGeneration

    out = tmp_path_factory.mktemp("t5-tiny-lm-adapt")
    torch.manual_seed(0)
    config = T5Config(vocab_size=32128, d_model=D_MODEL, d_kv=16, num_heads=4, d_ff=128,
                      num_layers=2, num_decoder_layers=2, feed_forward_proj="gated-gelu",
                      tie_word_embeddings=False, decoder_start_token_id=0)
    T5ForConditionalGeneration(config).save_pretrained(out, safe_serialization=True)
    shutil.copy(shared_data / "tokenizer" / "t5" / "spiece.model", out / "spiece.model")
    return out


def overrides(data: Path, storage: Path) -> list[str]:
    sni = {"kind": "sni", "path": str(data / "sni"), "split": "mini"}
    p3 = str(data / "p3")
    templates = {"templates": f"{p3}/promptsource_templates"}
    superglue = [{"kind": "p3", "path": f"{p3}/raw/super_glue/{d}/val.jsonl", "dataset": f"super_glue/{d}",
                  "part": "test", "example_cap": 24, **templates} for d in ("cb", "rte")]
    rendered = [f"{p3}/t0_train_rendered/{f}.jsonl.gz" for f in ("glue_mrpc_equivalent", "imdb_Reviewer_Enjoyment")]
    scoped = {
        "pretrain-c4": {"train": [{"kind": "c4", "path": str(data / "c4" / "c4-en.olmo-test-fixtures.json.gz"),
                                   "format": "pretrain", "segment_len": 48}]},
        "sni-def": {"train": [{**sni, "format": "def", "max_per_task": 2}],
                    "eval": [{**sni, "format": "def", "part": "test", "max_per_task": 4}]},
        "sni-def-2pos": {"train": [{**sni, "format": "def_pos", "max_per_task": 2}],
                         "eval": [{**sni, "format": "def_pos", "part": "test", "max_per_task": 4}]},
        "p3-joint": {"train": [{"kind": "p3_rendered", "path": p, "format": "joint", **templates} for p in rendered],
                     "eval": [{**s, "format": "joint"} for s in superglue]},
        "p3-split": {"train": [{"kind": "p3", "path": f"{p3}/raw/super_glue/rte/train.jsonl",
                                "dataset": "super_glue/rte", "format": "split", **templates}],
                     "eval": [{**s, "format": "split"} for s in superglue]},
    }
    out = ["model.preset=tiny", "train.num_workers=1", "train.cpus_per_worker=0.5", "train.use_gpu=false",
           "train.global_batch_size=4", "train.micro_batch_size=4", "train.max_steps=2",
           "train.activation_checkpointing=false", "train.checkpoint_every=0", "train.log_every=1",
           "train.eval_examples=4", "data.max_input_len=256", "data.max_hyper_len=256",
           "data.max_target_len=8", f"run.storage_path={storage}"]
    for setup, parts in scoped.items():
        out += [f"{setup}:data.{part}={json.dumps(sources)}" for part, sources in parts.items()]
    return out


def params(storage: Path, name: str, experiment: str = "hint-3b") -> dict:
    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    (run,) = client.search_runs([exp.experiment_id], f"tags.`{runs.RUN_NAME_TAG}` = '{name}'")
    assert run.info.status == "FINISHED", name
    return run.data.params


def table_csv(storage: Path, key: str) -> list[dict]:
    with open(storage / "paper" / f"{key}-xl.csv") as f:
        return list(csv.DictReader(f))


@contextlib.contextmanager
def capture():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        yield out


def number(value: str) -> float:
    assert value != "", "an empty cell"
    return float(value)


ROWS = {"table1": ("HINT",), "table2": ("T0", "HINT (split)", "HINT (joint)"), "table7": (), "flops": ()}


@pytest.fixture(scope="module")
def rehearsal(ray_local, shared_data, t5_dir, tmp_path_factory):
    """Every chain run once through `hint paper run`, then every table through `hint paper
    table`; the Markdown each printed, by table."""
    storage = tmp_path_factory.mktemp("paper") / "runs"
    args = [*overrides(shared_data, storage), f"--checkpoint={t5_dir}"]
    start = time.monotonic()
    for key, labels in ROWS.items():
        if key != "flops":  # Appendix C is computed, nothing to run
            assert cli.main(["paper", "run", key, *args, *[f"--row={r}" for r in labels]]) == 0
    wall = time.monotonic() - start
    printed = {}
    for key, labels in ROWS.items():
        with capture() as out:
            assert cli.main(["paper", "table", key, *args, *[f"--row={r}" for r in labels]]) == 0
        printed[key] = out.getvalue().split("\nMarkdown and CSV")[0]
    print(f"\nrehearsal: runs {wall:.0f}s\n" + "\n".join(printed.values()))
    return storage, args, printed


def test_each_stage_starts_from_the_export_before_it(rehearsal, t5_dir):
    storage, _, _ = rehearsal
    pretrain, fresh = "hint-3b-pretrain-c4", load_file(t5_dir / "model.safetensors")
    assert params(storage, pretrain)["model.init_from"] == str(t5_dir)
    exported = load_file(storage / pretrain / "export" / "model.safetensors")
    assert not torch.equal(exported["t5.shared.weight"], fresh["shared.weight"])
    for name in ("hint-3b-sni-def", "hint-3b-sni-def-2pos", "hint-3b-p3-joint", "hint-3b-p3-split"):
        assert params(storage, name)["model.init_from"] == str(storage / pretrain / "export")
        tuned = load_file(storage / name / "export" / "model.safetensors")
        assert not torch.equal(tuned["t5.shared.weight"], exported["t5.shared.weight"]), name
    t0 = params(storage, "t0-3b-p3")  # a baseline: from the LM-adapted T5, its inputs concatenated
    assert (t0["model.init_from"], t0["model.variant"]) == (str(t5_dir), "concat")
    assert {s["format"] for s in json.loads(t0["data.train"])} == {"concat"}


def test_a_second_run_skips_what_finished(rehearsal, capsys):
    _, args, _ = rehearsal
    capsys.readouterr()
    assert cli.main(["paper", "run", "table1", *args, "--row=HINT"]) == 0
    assert "table1 (xl): 5 skipped\n" in capsys.readouterr().out


def test_the_tables_have_every_row(rehearsal):
    storage, _, printed = rehearsal
    (hint,) = table_csv(storage, "table1")
    assert hint["model"] == "HINT" and "| HINT |" in printed["table1"]
    for column in ("Def", "Def + 2 Pos."):
        assert 0 <= number(hint[f"{column} ROUGE-L"]) <= 100 and number(hint[f"{column} GFLOPs"]) > 0
    p3 = {r["model"]: r for r in table_csv(storage, "table2")}
    assert list(p3) == list(ROWS["table2"])
    assert all(0 <= number(r["Acc."]) <= 100 and number(r["GFLOPs"]) > 0 for r in p3.values())
    with open(storage / "paper" / "table2-xl-categories.csv") as f:
        categories = {r[0]: r[1:] for r in csv.reader(f)}
    assert {"super_glue/cb", "super_glue/rte"} <= set(categories)
    assert all(0 <= number(v) <= 100 for v in categories["super_glue/cb"])
    lengths = {r["data"]: r for r in table_csv(storage, "table7")}
    assert list(lengths) == [r.label for r in plan.LENGTHS.rows]
    # Tk-Instruct reads the definition in its input, HINT in its hypernetwork
    assert number(lengths["SNI Def (Tk-Instruct)"]["input"]) > number(lengths["SNI Def (HINT)"]["input"])
    assert (number(lengths["SNI Def + 2 Pos. (HINT)"]["instruction"])
            > number(lengths["SNI Def (HINT)"]["instruction"]))
    flops = {r["setting"]: r for r in table_csv(storage, "flops")}
    assert list(flops) == [r.label for r in plan.FLOPS.rows]
    assert number(flops["SNI Def + 2 Pos."]["concat/HINT"]) > number(flops["SNI Def"]["concat/HINT"]) > 1

    client = MlflowClient(tracking_uri=f"sqlite:///{storage / 'mlflow.db'}")
    exp = client.get_experiment_by_name("hint-3b")
    (logged,) = client.search_runs([exp.experiment_id], "attributes.run_name = 'paper-table2-xl'")
    names = {a.path for a in client.list_artifacts(logged.info.run_id, "paper")}
    assert names == {"paper/table2-xl.md", "paper/table2-xl.csv", "paper/table2-xl-categories.csv"}


def test_hint_eval_of_an_export_gives_the_tables_figure(rehearsal, shared_data, t5_dir, tmp_path):
    """`hint eval` with the stage's own config and overrides (what `hint paper run` printed)."""
    storage, _, _ = rehearsal
    (hint,) = table_csv(storage, "table1")
    stage = resolve(plan.HINT_DEF, "xl", overrides(shared_data, storage), checkpoint=str(t5_dir))
    assert cli.main(["eval", str(storage / stage.name / "export"), stage.config, *stage.overrides,
                     "--no-mlflow", "--max-new-tokens=8", f"--out={tmp_path}"]) == 0
    overall = json.loads((tmp_path / "metrics.json").read_text())["overall"]
    assert overall["rougeL"] == pytest.approx(number(hint["Def ROUGE-L"]), abs=0.01)


DECODERS = {"GPT-2 XL": "gpt2", "OPT-13B": "opt"}


def tiny_decoder(family: str, out: Path, shared_data: Path) -> Path:
    """A tiny random GPT-2 or OPT saved as transformers saves it, with its tokenizer's files."""
    train_byte_bpe(sni_texts(shared_data / "sni"), out, family)
    save_tiny_decoder(family, out)
    return out


@pytest.fixture(scope="module")
def decoder_rehearsal(ray_local, shared_data, tmp_path_factory):
    """Each decoder-only stage of Table 1 trained with `fit` (the platform's path, one point of
    its sweep) and evaluated as `hint paper run` evaluates a cell, then `hint paper table`."""
    storage = tmp_path_factory.mktemp("decoders") / "runs"
    sni = {"kind": "sni", "path": str(shared_data / "sni"), "split": "mini", "format": "concat"}
    args = ["train.num_workers=1", "train.cpus_per_worker=0.5", "train.use_gpu=false",
            "train.global_batch_size=4", "train.micro_batch_size=4", "train.max_steps=2",
            "train.warmup_steps=1", "train.activation_checkpointing=false", "train.checkpoint_every=0",
            "train.log_every=1", "train.eval_examples=4", "data.max_input_len=128",
            "data.max_hyper_len=256", "data.max_target_len=8", f"run.storage_path={storage}"]
    rows = [row for row in plan.TABLE1.rows if row.label in DECODERS]
    for row in rows:
        checkpoint = tiny_decoder(DECODERS[row.label], tmp_path_factory.mktemp(DECODERS[row.label]), shared_data)
        for _, stage in row.cells:
            sources = [{**sni, "max_per_task": 2}], [{**sni, "part": "test", "max_per_task": 3}]
            args += [f"{stage.setup}:model.init_from={checkpoint}", f"{stage.setup}:data.tokenizer={checkpoint}",
                     f"{stage.setup}:data.train={json.dumps(sources[0])}",
                     f"{stage.setup}:data.eval={json.dumps(sources[1])}"]
    start = time.monotonic()
    for row in rows:
        for _, stage in row.cells:
            resolved = resolve(stage, "xl", args)
            runner.train(resolved, print)
            runner.evaluate_stage(resolved, print)
    wall = time.monotonic() - start
    with capture() as out:
        assert cli.main(["paper", "table", "table1", *args, *[f"--row={r}" for r in DECODERS]]) == 0
    print(f"\ndecoder rehearsal: runs {wall:.0f}s\n{out.getvalue()}")
    return storage, args


def test_decoder_baselines_are_in_table1(decoder_rehearsal):
    storage, _ = decoder_rehearsal
    rows = {r["model"]: r for r in table_csv(storage, "table1")}
    assert list(rows) == list(DECODERS)
    for row in rows.values():
        for column in ("Def", "Def + 2 Pos."):
            assert 0 <= number(row[f"{column} ROUGE-L"]) <= 100 and number(row[f"{column} GFLOPs"]) > 0
    # The instruction is the prompt's prefix, read once a task: Def + 2 Pos. costs more per task.
    assert number(rows["OPT-13B"]["Def + 2 Pos. GFLOPs"]) > number(rows["OPT-13B"]["Def GFLOPs"])


def test_decoder_stages_train_from_their_checkpoint_in_the_causal_layout(decoder_rehearsal):
    storage, _ = decoder_rehearsal
    for name in ("gpt2-xl-sni-def", "opt-13b-sni-def-2pos"):
        logged = params(storage, name, experiment="decoder-baselines")
        assert (logged["model.variant"], logged["train.optimizer"], logged["train.lr_schedule"]) == (
            "concat", "adamw", "linear")
        export = json.loads((storage / name / "export" / "config.json").read_text())["config"]
        assert export["model_type"] == name.split("-")[0] and export["variant"] == "concat"
        assert (storage / name / "export" / "tokenizer" / "tokenizer.json").is_file()


def test_a_decoder_cell_evaluated_before_skips_its_sweep(decoder_rehearsal, capsys):
    """`hint paper run` finds each decoder-only cell's evaluation and starts no sweep."""
    _, args = decoder_rehearsal
    capsys.readouterr()
    assert cli.main(["paper", "run", "table1", *args, *[f"--row={r}" for r in DECODERS]]) == 0
    out = capsys.readouterr().out
    assert out.count("swept and evaluated before") == 4 and "table1 (xl): 4 skipped\n" in out
