"""Experiment config validation: every mistake names its key and what is valid."""

import dataclasses
import re

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


@pytest.mark.parametrize("key", ["log_every", "max_steps", "micro_batch_size", "eval_examples",
                                 "num_workers", "global_batch_size"])
def test_counts_of_zero_or_less_are_refused_naming_the_key(key):
    for value in (0, -1):
        with pytest.raises(ConfigError, match=rf"train\.{key}: must be positive, got {value}"):
            config.from_dict({"train": {key: value}})


@pytest.mark.parametrize("key", ["checkpoint_every", "eval_every", "max_failures", "seed"])
def test_negative_intervals_and_seeds_are_refused_naming_the_key(key):
    assert getattr(config.from_dict({"train": {key: 0}}).train, key) == 0  # 0 has a meaning
    with pytest.raises(ConfigError, match=rf"train\.{key}: must be 0 or more, got -1"):
        config.from_dict({"train": {key: -1}})


def test_every_int_field_of_the_train_section_is_range_checked():
    ints = [f.name for f in dataclasses.fields(config.TrainSection) if f.type == "int"]
    for key in ints:
        with pytest.raises(ConfigError, match=rf"train\.{key}: must be"):
            config.from_dict({"train": {key: -1}})


@pytest.mark.parametrize("key", ["name", "run.experiment", "run.register_as"])
@pytest.mark.parametrize("bad", ["../../x", "a/b", "x'y", "", "a b", "..", "a..b", "-x", "x" * 101])
def test_names_that_escape_paths_or_break_filters_are_refused(key, bad):
    with pytest.raises(ConfigError, match=rf"{re.escape(key)}: .* is not a valid name"):
        config.from_dict({}).with_overrides({key: bad})


def test_ordinary_names_pass():
    cfg = config.from_dict({}).with_overrides(
        {"name": "hint-3b-sni-def_2.pos", "run.experiment": "HINT_11b", "run.register_as": "hint-3b"})
    assert cfg.name == "hint-3b-sni-def_2.pos"
