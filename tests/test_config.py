"""Experiment config validation: every mistake names its key and what is valid."""

import pytest

from hint_platform import config
from hint_platform.config import ConfigError


def test_defaults_are_the_paper_optimizer():
    cfg = config.from_dict({})
    assert (cfg.train.optimizer, cfg.train.lr, cfg.train.global_batch_size) == ("adafactor", 1e-3, 1024)


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown key train\.max_step; valid keys under train: .*max_steps"):
        config.from_dict({"train": {"max_step": 3}})


def test_wrong_type_names_the_key():
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected an integer, got 'ten'"):
        config.from_dict({"train": {"max_steps": "ten"}})
    with pytest.raises(ConfigError, match=r"train\.fsdp: expected true or false"):
        config.from_dict({"train": {"fsdp": "yes"}})


def test_bad_choice_lists_choices():
    with pytest.raises(ConfigError, match=r"train\.optimizer: 'sgd' is not one of adafactor, adamw"):
        config.from_dict({"train": {"optimizer": "sgd"}})


def test_global_batch_must_split_over_workers():
    with pytest.raises(ConfigError, match=r"multiple of train\.num_workers x train\.micro_batch_size \(6\)"):
        config.from_dict({"train": {"num_workers": 2, "micro_batch_size": 3, "global_batch_size": 8}})


def test_overrides_parse_yaml_scalars_and_reach_model_overrides():
    cfg = config.from_dict({}).with_overrides(
        ["train.max_steps=7", "train.lr=3e-4", "model.variant=concat", "model.overrides.d_model=64"]
    )
    assert cfg.train.max_steps == 7 and cfg.train.lr == pytest.approx(3e-4)
    assert cfg.model.variant == "concat" and cfg.model.overrides == {"d_model": 64}
    assert cfg.flat()["model.overrides"] == {"d_model": 64}


def test_override_of_unknown_key_or_section_fails():
    with pytest.raises(ConfigError, match=r"unknown key train\.bogus"):
        config.from_dict({}).with_overrides(["train.bogus=1"])
    with pytest.raises(ConfigError, match=r"no section 'trian'"):
        config.from_dict({}).with_overrides(["trian.max_steps=1"])
    with pytest.raises(ConfigError, match=r"expected key=value"):
        config.from_dict({}).with_overrides(["train.max_steps"])


def test_load_names_the_file(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("train:\n  optimizer: sgd\n")
    with pytest.raises(ConfigError, match=rf"{path.name}: train\.optimizer"):
        config.load(path)
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "missing.yaml")
