"""A training config checked before anything starts, its paths made absolute.

Relative paths are the user's: they are resolved against the directory the command ran in,
once, here; Ray Train workers and Ray Tune trials run in directories of their own. `check`
does every check that needs no data: the model section (and, when `model.init_from` is an
export, what loading it into this variant drops or initialises), the data sources' fields,
the tokenizer, the train section; inputs that do not exist yet are listed, not refused (a
dry run of a stage whose input an earlier stage writes). `resolve` (what `fit` calls) wants
them all. `hint train --dry-run`, `hint tune` (the base and every point of a study) and `hint
submit` go through the same two functions.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from hint_model import CheckpointError, HintConfig, HintModel
from hint_platform import export, storage
from hint_platform.config import ConfigError, ExperimentConfig, model_config
from hint_platform.errors import UserError
from pipelines import SourceSpec
from pipelines.spec import SpecError

SQLITE = "sqlite:///"


@dataclass
class Checked:
    cfg: ExperimentConfig  # paths absolute, the tokenizer found
    missing: list[str] = field(default_factory=list)  # `key: path` of inputs not there (yet)
    notes: list[str] = field(default_factory=list)  # what loading model.init_from will do


def resolve(cfg: ExperimentConfig, relative_to: str | Path | None = None) -> ExperimentConfig:
    """`cfg` checked (`check`), with every input there; relative paths are taken from
    `relative_to` (default: the current directory)."""
    checked = check(cfg, relative_to)
    if checked.missing:
        first = checked.missing[0]
        pattern = glob.has_magic(first.split(": ", 1)[1])
        raise ConfigError(f"{first} {'matches no file' if pattern else 'does not exist'}")
    return checked.cfg


def check(cfg: ExperimentConfig, relative_to: str | Path | None = None) -> Checked:
    """Every check of `cfg` that needs no data, its paths made absolute against
    `relative_to` (default: the current directory), and the inputs that do not exist."""
    base = Path(relative_to or os.getcwd())
    model = model_config(cfg)
    if not cfg.data.train:
        raise ConfigError("data.train: no training sources")
    if not cfg.train.fsdp and cfg.train.num_workers > 1:
        raise ConfigError("train.fsdp=false trains in one process: set train.num_workers=1")
    missing: list[str] = []
    notes: list[str] = []
    if "://" in cfg.run.storage_path:
        storage.check_uri(cfg.run.storage_path, "run.storage_path")
    absolute: dict = {"run.storage_path": str(_absolute(cfg.run.storage_path, base))}
    for split in ("train", "eval"):
        sources = [dict(s) for s in getattr(cfg.data, split)]
        for i, source in enumerate(sources):
            where = f"data.{split}[{i}]"
            try:
                SourceSpec.from_dict(source, where=where)
            except SpecError as e:
                raise ConfigError(str(e)) from None
            for key in ("path", "edited_prompts"):
                if not source.get(key) or "://" in source[key]:
                    continue
                source[key] = str(_absolute(source[key], base))
                if not (glob.glob(source[key]) if glob.has_magic(source[key]) else Path(source[key]).exists()):
                    missing.append(f"{where}.{key}: {source[key]}")
        absolute[f"data.{split}"] = sources
    for key in ("model.init_from", "data.tokenizer"):
        # Read with from_pretrained / sentencepiece, which take local files only.
        if cfg.flat()[key] and "://" in cfg.flat()[key]:
            raise ConfigError(f"{key}={cfg.flat()[key]}: a model and its tokenizer are read from a "
                              "local or mounted directory (a shared volume on a cluster), not an "
                              "object store; copy it there")
    init_from = cfg.model.init_from and _absolute(cfg.model.init_from, base)
    if init_from:
        absolute["model.init_from"] = str(init_from)
    positions = model.max_position_embeddings if model.is_decoder_only else None
    if init_from:
        if init_from.exists():
            model, note, positions = _check_init_from(cfg, init_from, model)
            notes += note
        else:
            missing.append(f"model.init_from: {init_from}")
    d = cfg.data
    if positions and d.max_hyper_len + d.max_input_len + d.max_target_len > positions:
        raise ConfigError(
            f"data.max_hyper_len + data.max_input_len + data.max_target_len = "
            f"{d.max_hyper_len} + {d.max_input_len} + {d.max_target_len} tokens: a decoder-only "
            f"model reads them as one sequence, longer than its {positions} positions; lower them")
    tokenizer = cfg.data.tokenizer and _absolute(cfg.data.tokenizer, base) or init_from
    if not tokenizer:
        raise ConfigError("data.tokenizer: not set (set it, or model.init_from to a model "
                          "directory that holds its tokenizer)")
    if not tokenizer.exists():
        if cfg.data.tokenizer:
            absolute["data.tokenizer"] = str(tokenizer)
            missing.append(f"data.tokenizer: {tokenizer}")
    elif not tokenizer.is_dir():
        raise ConfigError(f"data.tokenizer: {tokenizer} is not a directory")
    else:
        try:
            absolute["data.tokenizer"] = str(export.tokenizer_dir(tokenizer))
        except UserError as e:
            raise ConfigError(f"data.tokenizer: {e}") from None
    if cfg.data.max_hyper_len > model.max_hyper_len:
        raise ConfigError(f"data.max_hyper_len: {cfg.data.max_hyper_len} tokens of instruction, "
                          f"more than the model reads (HintConfig.max_hyper_len="
                          f"{model.max_hyper_len}): lower it or raise "
                          "model.overrides.max_hyper_len")
    uri = cfg.run.tracking_uri
    if uri and uri.startswith(SQLITE) and not os.path.isabs(uri.removeprefix(SQLITE)):
        absolute["run.tracking_uri"] = SQLITE + str(base / uri.removeprefix(SQLITE))
    return Checked(cfg.with_overrides(absolute), missing, notes)


def _check_init_from(cfg: ExperimentConfig, init_from: Path,
                     model: HintConfig) -> tuple[HintConfig, list[str], int | None]:
    """`model.init_from` read by content, as the workers will: a Hugging Face checkpoint
    (`model` stands), or an export of this platform, loaded into the config's variant (checked
    on shapes only): the model config it makes, what loading it drops or initialises, and the
    positions of a decoder-only model (None for T5)."""
    config_file = init_from / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"model.init_from: {init_from} has no config.json; expected a Hugging "
                          "Face checkpoint or the export of a run")
    try:
        data = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"model.init_from: {config_file} is not valid JSON: {e}") from None
    if data.get("format") != "hint":  # a Hugging Face checkpoint: GPT-2 calls them n_positions
        positions = None if data.get("model_type") == "t5" else (
            data.get("n_positions") or data.get("max_position_embeddings"))
        return model, [], positions
    try:
        export.check(init_from)
    except UserError as e:
        raise ConfigError(f"model.init_from: {e}") from None
    try:
        model, report = HintModel.plan_from_pretrained(init_from, variant=cfg.model.variant,
                                                   **cfg.model.overrides)
    except (CheckpointError, ValueError) as e:
        raise ConfigError(f"model.init_from: {e}") from None
    source = data.get("config", {}).get("variant")
    positions = model.max_position_embeddings if model.is_decoder_only else None
    if source == cfg.model.variant and not (report.dropped or report.initialised):
        return model, [], positions
    return model, [f"model.init_from: a {source!r} export loaded as {cfg.model.variant!r}: {report}"], positions


def _absolute(path: str, base: Path) -> Path | str:
    """A local path made absolute against `base`; a URI (s3://...) as it is."""
    if "://" in path:
        return path
    return Path(os.path.normpath(base / Path(path).expanduser()))
