"""What a study run is, checked before anything runs: the study (tune_spaces/), its base config
with the command line's overrides, and the options given on the command line. Every point of
the search space is validated against the config schema and the model's config here, so a bad
key fails before Ray starts or a trial is spent.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ray.tune.search.sample import Categorical, Domain

from hint_platform import config
from hint_platform.config import ConfigError, ExperimentConfig
from hint_platform.tracking import runs
from tune_spaces import Study, load_study

OPTIONS = ("num_samples", "max_concurrent", "scheduler", "grace_period")


@dataclass
class StudyRun:
    study: Study
    base: ExperimentConfig  # the base config with the command line's overrides
    options: dict[str, Any]  # num_samples, max_concurrent, ... given on the command line

    @property
    def name(self) -> str:
        return f"{self.base.name}-{self.study.name}"

    @property
    def path(self) -> Path:
        """Tune's experiment directory."""
        return runs.storage_dir(self.base) / "tune" / self.name

    @property
    def tracking_uri(self) -> str:
        return runs.resolve_tracking_uri(self.base)

    def option(self, key: str) -> Any:
        """The command line's value of a study option, else the study's default."""
        value = self.options.get(key)
        return getattr(self.study, key) if value is None else value

    def expected_trials(self, num_samples: int) -> int:
        """Trials a finished study has: every grid point, `num_samples` times."""
        return num_samples * math.prod(len(d["grid_search"]) for d in self.study.space.values()
                                       if is_grid(d))


def load_study_run(study: str | Study, config_path: str | Path | None = None,
                   overrides: list[str] | dict[str, Any] = (), **options: Any) -> StudyRun:
    """The study (a name in tune_spaces, or a Study) over its base config (`config_path`, else
    the study's own), checked: options, the base, and every point of the space.

    `options`: num_samples, max_concurrent, scheduler (asha | fifo), grace_period; None keeps
    the study's default.
    """
    if isinstance(study, str):
        try:
            study = load_study(study)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
    path = config.find(config_path or study.base_config)
    base = config.load(path, study.base_overrides)
    if overrides:
        base = base.with_overrides(overrides)
    run = StudyRun(study, base, options)
    if run.option("scheduler") not in ("asha", "fifo"):
        raise ConfigError(f"scheduler {run.option('scheduler')!r} is not one of asha, fifo")
    if study.mode not in ("min", "max"):
        raise ConfigError(f"study {study.name}: mode {study.mode!r} is not one of min, max")
    for key in ("num_samples", "max_concurrent", "grace_period"):
        if run.option(key) < 1:
            raise ConfigError(f"{key} must be at least 1, got {run.option(key)}")
    try:
        config.model_config(base)
    except ConfigError as e:
        raise ConfigError(f"base config {path}: {e}") from None
    for key, domain in study.space.items():
        for value in candidates(domain):
            try:
                config.model_config(apply_point(base, {key: value}))
            except ConfigError as e:
                raise ConfigError(f"study {study.name}, search-space key {key}: {e}") from None
    # Keys valid one by one can still clash together (a decoder generator with generator_heads).
    keys = list(study.space)
    for values in itertools.product(*(candidates(study.space[k]) for k in keys)):
        point = dict(zip(keys, values))
        try:
            config.model_config(apply_point(base, point))
        except ConfigError as e:
            raise ConfigError(f"study {study.name}, search-space point {point}: {e}") from None
    return run


def apply_point(base: ExperimentConfig, point: dict[str, Any]) -> ExperimentConfig:
    """The config of one trial: `point` (dotted keys; a mapping value sets keys under its key)
    applied to `base`."""
    return base.with_overrides(config.flatten(point))


def point_label(point: dict[str, Any]) -> str:
    """A trial's point as a person reads it: `adapter_size=64 prefix_length=30`."""
    return " ".join(f"{k.removeprefix('model.overrides.').removeprefix('model.')}={v}"
                    for k, v in config.flatten(point).items())


def candidates(domain: Any) -> list[Any]:
    """The values a search-space entry can take (one sample for a continuous domain)."""
    if is_grid(domain):
        return list(domain["grid_search"])
    if isinstance(domain, Categorical):
        return list(domain.categories)
    if isinstance(domain, Domain):
        return [domain.sample()]
    return [domain]


def is_grid(domain: Any) -> bool:
    return isinstance(domain, dict) and set(domain) == {"grid_search"}
