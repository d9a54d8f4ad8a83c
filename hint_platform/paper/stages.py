"""A stage of the plan at a size, as the platform runs it: the shipped config and the `key=value`
overrides that make it this stage (`hint train CONFIG overrides...` is the same run).

User overrides come in two forms: `key=value` for every stage, and `SETUP:key=value` for the
stages built on config paper/hint-{size}-SETUP only (the rehearsal points each setup at its own
sample data). They apply first; the stage's own changes (variant, source fields, where it starts
from) apply on top, so a baseline's `format: concat` still holds on overridden sources.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from hint_platform import config
from hint_platform.config import ExperimentConfig
from hint_platform.jobs.submit import shared_overrides
from hint_platform.paper.plan import PRETRAIN, Stage, source_fields

EXPORT = "export"  # fit's export: <run.storage_path>/<name>/export


@dataclass(frozen=True)
class Resolved:
    stage: Stage
    size: str
    config: str  # shipped config name
    overrides: list[str]
    cfg: ExperimentConfig

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def export_dir(self) -> str:
        """Where fit leaves the export, as the config writes paths (relative stays relative)."""
        return f"{self.cfg.run.storage_path.rstrip('/')}/{self.cfg.name}/{EXPORT}"

    def command(self) -> list[str]:
        return ["hint", "train", self.config, *self.overrides]


def split_overrides(overrides: list[str], setup: str) -> list[str]:
    """The overrides that apply to a stage on `setup`: the global ones and its scoped ones."""
    out = []
    for item in overrides:
        key = item.split("=", 1)[0]
        if ":" in key:
            scope, rest = item.split(":", 1)
            if scope == setup:
                out.append(rest)
        else:
            out.append(item)
    return out


def lm_adapted(size: str, overrides: list[str], checkpoint: str | None) -> str:
    """The LM-adapted T5 checkpoint the chains start from: `checkpoint`, else the one the
    pretraining config names."""
    if checkpoint:
        return checkpoint
    scoped = split_overrides(overrides, PRETRAIN.setup)
    return config.load(PRETRAIN.config_name(size), scoped).model.init_from


def resolve(stage: Stage, size: str, overrides: list[str] = (), *, checkpoint: str | None = None,
            shared_dir: str | None = None) -> Resolved:
    """`stage` at `size` with the user's overrides; `shared_dir` moves every relative path of
    the run under it (`hint submit --shared-dir`, the RayJobs)."""
    name = stage.config_name(size)
    mine = split_overrides(list(overrides), stage.setup)
    shipped = config.load(name, mine)
    if stage.run_name(size) != shipped.name:
        mine.append(f"name={stage.run_name(size)}")
    if stage.variant != shipped.model.variant:
        mine.append(f"model.variant={stage.variant}")
    mine += stage.overrides
    for part in ("train", "eval"):
        sources = getattr(shipped.data, part)
        changed = [source_fields(stage, s) for s in sources]
        if changed != sources:
            mine.append(f"data.{part}={json.dumps(changed)}")
    if stage.start:
        init = resolve(stage.start, size, overrides, checkpoint=checkpoint).export_dir
    elif stage.own_config:  # a decoder-only model: the checkpoint its config names
        init = shipped.model.init_from
    else:
        init = lm_adapted(size, list(overrides), checkpoint)
    if init != shipped.model.init_from:
        mine += [f"model.init_from={init}", f"data.tokenizer={init}"]
    if shared_dir:
        mine += shared_overrides(config.load(name, mine), shared_dir)
    return Resolved(stage, size, name, mine, config.load(name, mine))


def chain_commands(stage: Stage, size: str, shared_dir: str | None = None) -> list[list[str]]:
    """`hint train ...` of each stage of `stage`'s chain: what a RayJob's entrypoint runs."""
    return [resolve(s, size, shared_dir=shared_dir).command() for s in stage.chain()]
