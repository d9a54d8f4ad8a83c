"""`hint demo --quick` end to end: synthetic suite, pretrain + fine-tune of HINT and both
baselines on local Ray, zero-shot evaluation, registration, and the figures line."""

import json
import re

from hint_platform.tracking import registry
from hint_platform.cli import main

FIGURES = ("demo_minutes", "hint_rougeL", "no_instruct_rougeL", "concat_rougeL",
           "hint_minus_no_instruct_rougeL", "hint_minus_concat_rougeL",
           "hint_gflops_per_task", "concat_gflops_per_task")


def test_quick_demo_end_to_end(ray_local, tmp_path, capsys):
    out_dir = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out_dir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()

    last = lines[-1].split()
    assert [item.split("=")[0] for item in last] == list(FIGURES)
    figures = {k: float(v) for k, v in (item.split("=") for item in last)}
    for variant in ("hint", "no_instruct", "concat"):
        assert 0 <= figures[f"{variant}_rougeL"] <= 100
        predictions = (out_dir / "eval" / variant / "predictions.jsonl").read_text().splitlines()
        assert predictions and all("references" in json.loads(p) for p in predictions)
    for baseline in ("no_instruct", "concat"):
        difference = figures["hint_rougeL"] - figures[f"{baseline}_rougeL"]
        assert abs(figures[f"hint_minus_{baseline}_rougeL"] - difference) < 0.02
    # Per task, HINT reads the instruction once; concatenation re-reads it with every input.
    assert 0 < figures["hint_gflops_per_task"] < figures["concat_gflops_per_task"]

    ui = next(line for line in lines if line.startswith("MLflow UI:"))
    uri = re.search(r"--backend-store-uri (\S+)", ui).group(1)
    (version,) = registry.list_versions(uri, "hint-demo")
    assert version["aliases"] == ["champion"]
    assert (registry.resolve_export("models:/hint-demo@champion", uri) / "model.safetensors").is_file()
