"""Ray Tune studies of the paper's ablations: one module per study, each defining `STUDY`.

`hint tune STUDY` runs one (hint_platform/tuning/); this package holds only what is searched
and how, as data over experiment-config keys. It imports nothing of the platform.
"""

from __future__ import annotations

import importlib

from tune_spaces.study import Study

STUDIES = ("generator", "peft_size", "peft_type", "fusion", "pretraining", "decoder_baselines",
           "decoder_peft_type", "decoder_lora_rank", "decoder_fusion")


def load_study(name: str) -> Study:
    if name not in STUDIES:
        raise KeyError(f"unknown study {name!r}; studies: {', '.join(STUDIES)}")
    return importlib.import_module(f"tune_spaces.{name}").STUDY


__all__ = ["STUDIES", "Study", "load_study"]
