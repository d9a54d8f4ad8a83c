"""Every shipped experiment config loads, validates, and its data sources are valid SourceSpecs."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hint_platform import config
from pipelines.spec import SourceSpec

CONFIGS = sorted(config.SHIPPED.rglob("*.yaml"))
PAPER = {p.stem: p for p in CONFIGS if p.parent.name == "paper"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_with_valid_sources(path):
    cfg = config.load(path)
    for i, source in enumerate(cfg.data.train + cfg.data.eval):
        SourceSpec.from_dict(source, where=f"{path.name} source {i}")


@pytest.mark.parametrize("size,preset", [("3b", "xl"), ("11b", "xxl")])
def test_paper_setups_follow_the_paper(size, preset):
    setups = ("pretrain-c4", "sni-def", "sni-def-2pos", "p3-joint", "p3-split")
    for setup in setups:
        cfg = config.load(PAPER[f"hint-{size}-{setup}"])
        assert cfg.model.preset == preset
        assert (cfg.train.optimizer, cfg.train.lr) == ("adafactor", 1e-3)
        assert cfg.train.global_batch_size == (2048 if setup.startswith("p3") else 1024)
        if setup != "pretrain-c4":
            assert (cfg.data.max_input_len, cfg.data.max_target_len) == (1024, 256)
            assert cfg.model.init_from == f"runs/hint-{size}-pretrain-c4/export"
        # Paper Section 4: pretraining 10k steps (7k at 11B), SNI 1k, P3 10k; the hypernetwork
        # reads 512 tokens in pretraining and on P3, 1024 on SNI.
        steps = {"pretrain-c4": 7000 if size == "11b" else 10000, "sni-def": 1000, "sni-def-2pos": 1000,
                 "p3-joint": 10000, "p3-split": 10000}[setup]
        assert (cfg.train.max_steps, cfg.data.max_hyper_len) == (steps, 1024 if setup.startswith("sni") else 512)
    formats = {s: {d["format"] for d in config.load(PAPER[f"hint-{size}-{s}"]).data.train}
               for s in setups}
    assert formats == {"pretrain-c4": {"pretrain"}, "sni-def": {"def"}, "sni-def-2pos": {"def_pos"},
                       "p3-joint": {"joint"}, "p3-split": {"split"}}


def test_a_wheel_ships_the_configs(tmp_path):
    """A non-editable install (a wheel, an image built another way) finds the shipped configs
    through the package, not through a source tree."""
    repo = Path(__file__).resolve().parent.parent
    source = tmp_path / "source"  # a copy: building in place would leave build/ in the checkout
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "hint_model", "pipelines", "hint_platform",
                 "tune_spaces"):
        copy = shutil.copytree if (repo / name).is_dir() else shutil.copy
        copy(repo / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                          if (repo / name).is_dir() else {}))
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "-q", "--no-deps", "--no-build-isolation", str(source),
                    "-w", str(tmp_path / "wheel")], check=True, timeout=300, capture_output=True)
    (wheel,) = (tmp_path / "wheel").glob("hint-*.whl")
    subprocess.run([*pip, "install", "-q", "--no-deps", "--target", str(tmp_path / "site"),
                    str(wheel)], check=True, timeout=300, capture_output=True)
    probe = ("from hint_platform import config; "
             "print(config.find('paper/hint-3b-sni-def')); print(len(config.shipped_configs()))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(tmp_path / "site")})
    assert out.returncode == 0, out.stderr
    found, count = out.stdout.split()
    assert Path(found).is_relative_to(tmp_path / "site") and Path(found).is_file()
    assert int(count) == len(CONFIGS)
