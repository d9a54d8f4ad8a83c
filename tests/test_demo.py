"""`hint demo --quick` end to end: synthetic suite, pretrain + fine-tune of the T5 HINT, its two
baselines and the three decoder rows on local Ray, zero-shot evaluation (and the decoder's
random-instruction control), registration, and the figures line."""

import json
import re

import pytest

from hint_platform.cli import main
from hint_platform.recipes.demo import other_instructions
from hint_platform.tracking import registry

FIGURES = ("demo_minutes", "hint_rougeL", "no_instruct_rougeL", "concat_rougeL",
           "hint_minus_no_instruct_rougeL", "hint_minus_concat_rougeL",
           "hint_gflops_per_task", "concat_gflops_per_task",
           "decoder_hint_rougeL", "decoder_prompt_rougeL", "decoder_no_instruct_rougeL",
           "decoder_hint_minus_no_instruct_rougeL", "decoder_hint_minus_prompt_rougeL",
           "decoder_random_instruction_drop_rougeL")
ROWS = ("hint", "no_instruct", "concat", "decoder_hint", "decoder_prompt", "decoder_no_instruct",
        "decoder_hint_random_instruction")


# Eight short trainings on Ray Train (two T5 pretrainings, six rows): each pays the start-up of a
# trainer, which on a loaded 2-core machine can take the whole quick demo past the suite's 900 s.
@pytest.mark.timeout(1800)
def test_quick_demo_end_to_end(ray_local, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()

    last = lines[-1].split()
    assert [item.split("=")[0] for item in last] == list(FIGURES)
    figures = {k: float(v) for k, v in (item.split("=") for item in last)}
    for row in ROWS:
        predictions = (out_dir / "eval" / row / "predictions.jsonl").read_text().splitlines()
        assert predictions and all("references" in json.loads(p) for p in predictions)
        table_row = next(line for line in lines if line.split()[:1] == [row])
        rouge, _, gflops, state_kib = map(float, table_row.split()[1:])
        assert 0 <= rouge <= 100 and gflops > 0 and state_kib >= 0
    for baseline in ("no_instruct", "concat"):
        difference = figures["hint_rougeL"] - figures[f"{baseline}_rougeL"]
        assert abs(figures[f"hint_minus_{baseline}_rougeL"] - difference) < 0.02
    # Per task, HINT reads the instruction once; concatenation re-reads it with every input.
    assert 0 < figures["hint_gflops_per_task"] < figures["concat_gflops_per_task"]
    decoder = {row: json.loads((out_dir / "eval" / row / "metrics.json").read_text())["overall"]["rougeL"]
               for row in ("decoder_hint", "decoder_prompt", "decoder_hint_random_instruction")}
    assert abs(figures["decoder_hint_minus_prompt_rougeL"]
               - (decoder["decoder_hint"] - decoder["decoder_prompt"])) < 0.02
    assert abs(figures["decoder_random_instruction_drop_rougeL"]
               - (decoder["decoder_hint"] - decoder["decoder_hint_random_instruction"])) < 0.02

    ui = next(line for line in lines if line.startswith("MLflow UI:"))
    uri = re.search(r"--backend-store-uri (\S+)", ui).group(1)
    (version,) = registry.list_versions(uri, "hint-demo")
    assert version["aliases"] == ["champion"]
    assert (registry.resolve_export("models:/hint-demo@champion", uri) / "model.safetensors").is_file()


def test_random_instructions_come_from_other_tasks():
    """The Text-to-LoRA control: every task's inputs get ONE other task's instruction (seeded);
    inputs and references stay."""
    records = [{"task": f"t{t}", "hyper_input_ids": [t, t], "input_ids": [10 + i], "references": [str(i)]}
               for t in range(5) for i in range(3)]
    swapped = other_instructions(records, seed=0)
    assert swapped == other_instructions(records, seed=0)
    assert [{**r, "hyper_input_ids": None} for r in swapped] == [{**r, "hyper_input_ids": None} for r in records]
    for task in range(5):
        given = {tuple(r["hyper_input_ids"]) for r in swapped if r["task"] == f"t{task}"}
        assert len(given) == 1 and given != {(task, task)} and given <= {(t, t) for t in range(5)}
    assert any(other_instructions(records, seed=s) != swapped for s in range(1, 5))
