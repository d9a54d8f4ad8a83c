"""The export directory: what a training stage leaves behind, and what later stages, evaluation,
the registry and serving read. Written in one place (`write`), read through this module only.

    config.json          the model's HintConfig          (HintModel.save_pretrained)
    model.safetensors    the weights, no pickle          (HintModel.save_pretrained)
    tokenizer/           the tokenizer the model was trained with (spiece.model)
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor, nn

from hint_model import HintConfig, HintModel
from hint_model.checkpoint import read_config
from hint_platform.errors import UserError
from hint_platform.placement import inference_device, inference_dtype
from pipelines import Tokenizer, load_tokenizer
from pipelines.tokenizer import MODEL_FILE

CONFIG = "config.json"
TOKENIZER = "tokenizer"


def write(model: nn.Module, directory: str | Path, tokenizer_dir: str | Path,
          state_dict: dict[str, Tensor] | None = None) -> Path:
    """Saves `model` (or `state_dict`, e.g. gathered from FSDP shards) and a copy of its tokenizer."""
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=state_dict)
    shutil.copytree(tokenizer_dir, directory / TOKENIZER, dirs_exist_ok=True)
    return directory


def is_export(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / CONFIG).is_file() and (directory / TOKENIZER / MODEL_FILE).is_file()


def tokenizer_dir(directory: str | Path) -> Path:
    """The tokenizer that goes with a model directory: an export's `tokenizer/`, or the directory
    itself where it holds `spiece.model` (a Hugging Face T5 checkpoint, a tokenizer directory)."""
    directory = Path(directory)
    for candidate in (directory / TOKENIZER, directory):
        if (candidate / MODEL_FILE).is_file():
            return candidate
    raise UserError(f"{directory}: no tokenizer ({MODEL_FILE} in it or in {TOKENIZER}/)")


def model_config(directory: str | Path) -> HintConfig:
    """The export's model config, without reading its weights."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise UserError(f"{directory}: not a model export (no {CONFIG})")
    return read_config(directory)


def load(directory: str | Path, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None) -> tuple[HintModel, Tokenizer]:
    """The exported model, in eval mode on `device` (default: `placement.inference_device()`, the
    GPU Ray assigned to this process) in `dtype` (default: bf16 on CUDA, fp32 on the CPU), and
    its tokenizer."""
    model_config(directory)  # a clear error for a directory that is not an export
    device = torch.device(device) if device is not None else inference_device()
    with torch.device(device):  # parameters made there: no full fp32 copy in host memory
        model = HintModel.from_pretrained(directory)
    model = model.to(dtype=inference_dtype(device, dtype)).eval()
    return model, load_tokenizer(tokenizer_dir(directory))
