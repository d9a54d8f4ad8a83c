"""The export directory: what a training stage leaves behind, and what later stages, evaluation,
the registry and serving read. Written in one place (`write`), read through this module only.

    config.json          the model's HintConfig          (HintModel.save_pretrained)
    model.safetensors    the weights, no pickle          (HintModel.save_pretrained)
    tokenizer/           the tokenizer the model was trained with: spiece.model (T5's
                         SentencePiece) or tokenizer.json (+ its Hugging Face side files)
"""

from __future__ import annotations

import shutil
from pathlib import Path

from torch import Tensor, nn

from hint_model import HintModel
from hint_platform.errors import UserError
from pipelines import Tokenizer, load_tokenizer
from pipelines.tokenizer import HF_FILE, MODEL_FILE, SIDE_FILES

CONFIG = "config.json"
TOKENIZER = "tokenizer"


def write(model: nn.Module, directory: str | Path, tokenizer_dir: str | Path,
          state_dict: dict[str, Tensor] | None = None) -> Path:
    """Saves `model` (or `state_dict`, e.g. gathered from FSDP shards) and a copy of its
    tokenizer's files (only those: a tokenizer directory may be a whole model checkpoint)."""
    directory = Path(directory)
    model.save_pretrained(directory, state_dict=state_dict)
    out = directory / TOKENIZER
    out.mkdir(exist_ok=True)
    for name in SIDE_FILES:
        if (Path(tokenizer_dir) / name).is_file():
            shutil.copyfile(Path(tokenizer_dir) / name, out / name)
    load_tokenizer(tokenizer_dir).save(out)
    return directory


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (MODEL_FILE, HF_FILE))


def is_export(directory: str | Path) -> bool:
    directory = Path(directory)
    return (directory / CONFIG).is_file() and _has_tokenizer(directory / TOKENIZER)


def tokenizer_dir(directory: str | Path) -> Path:
    """The tokenizer that goes with a model directory: an export's `tokenizer/`, or the directory
    itself where it holds `spiece.model` or `tokenizer.json` (a Hugging Face checkpoint, a
    tokenizer directory)."""
    directory = Path(directory)
    for candidate in (directory / TOKENIZER, directory):
        if _has_tokenizer(candidate):
            return candidate
    raise UserError(f"{directory}: no tokenizer ({MODEL_FILE} or {HF_FILE} in it or in {TOKENIZER}/)")


def load(directory: str | Path) -> tuple[HintModel, Tokenizer]:
    """The exported model (in eval mode) and its tokenizer."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise UserError(f"{directory}: not a model export (no {CONFIG})")
    return HintModel.from_pretrained(directory).eval(), load_tokenizer(tokenizer_dir(directory))
