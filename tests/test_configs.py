"""Every shipped experiment config loads, validates, and its data sources are valid SourceSpecs."""

from pathlib import Path

import pytest

from hint_platform import config
from pipelines.spec import SourceSpec

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").rglob("*.yaml"))
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
    formats = {s: {d["format"] for d in config.load(PAPER[f"hint-{size}-{s}"]).data.train}
               for s in setups}
    assert formats == {"pretrain-c4": {"pretrain"}, "sni-def": {"def"}, "sni-def-2pos": {"def_pos"},
                       "p3-joint": {"joint"}, "p3-split": {"split"}}
