"""The HINT model in plain PyTorch: T5 v1.1 / v1.0 (or a decoder-only GPT-2, OPT, Llama) plus
a hypernetwork that turns an instruction into adapters, prefixes or LoRA. No Ray, no MLflow, no
corpus formats here."""

from hint_model.checkpoint import CheckpointError
from hint_model.config import SIZE_PRESETS, VARIANT_PRESETS, HintConfig, HintConfigError
from hint_model.decoder_hint import DecoderHintModel  # noqa: F401  (registers itself with HintModel)
from hint_model.hint import HintModel, HintOutput
from hint_model.task_modules import TaskModules

__all__ = ["CheckpointError", "HintConfig", "HintConfigError", "HintModel", "HintOutput",
           "SIZE_PRESETS", "TaskModules", "VARIANT_PRESETS"]
