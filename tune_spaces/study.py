"""What a study is: a search space over experiment-config keys, and how to search it.

A study is data. Its `space` maps dotted experiment-config keys (`model.variant`,
`model.overrides.adapter_size`, `train.lr`, ...) to Ray Tune domains (`tune.grid_search`,
`tune.choice`, ...) or plain values. A value that is a mapping sets several keys under its key at
once: `{"model.overrides": tune.grid_search([{"generator": "decoder", "generator_layers": 2}, ...])}`
sweeps over whole settings, where crossing two grids would make meaningless pairs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Study:
    name: str
    question: str  # the paper's question this study answers, one line (the report's title)
    space: dict[str, Any]
    metric: str = "eval_loss"  # reported by training every train.eval_every steps
    mode: str = "min"
    # The config a study starts from when `--config` is not given (a config the platform ships),
    # and the values it needs set on any base (e.g. evaluations often enough for ASHA).
    base_config: str = "paper/hint-3b-sni-def"
    base_overrides: dict[str, Any] = field(default_factory=lambda: {"train.eval_every": 100})
    num_samples: int = 1  # repeats of the space; grid_search values are all run each time
    scheduler: str = "asha"  # asha | fifo
    grace_period: int = 200  # optimizer steps a trial runs before ASHA may stop it
    reduction_factor: int = 2
    max_concurrent: int = 1  # trials at once; each trial is a whole multi-worker training run
