"""The export directory: what a training stage leaves behind, and what later stages, evaluation,
the registry and serving read. Written in one place (`write`), read through this module only.

    config.json            the model's HintConfig          (HintModel.save_pretrained)
    model.safetensors      the weights, no pickle          (HintModel.save_pretrained)
    tokenizer/             the tokenizer the model was trained with: spiece.model (T5's
                           SentencePiece) or tokenizer.json (+ its Hugging Face side files)
    optimizer.safetensors  the optimizer's state by parameter name, and its step (training's
                           `init_from` continues it; training/optim.py); absent when not carried
    data_format.json       the input format the model was trained on, which serving builds again
                           (`DataFormat`); absent when not written by training: SNI's
    manifest.json          every other file's size and sha256, written last

An export is written into a temporary directory beside its place and renamed into it once its
manifest is written: a reader sees a whole export or none, whenever the writer dies. `check`
refuses what has no manifest or does not match it (truncated, missing or altered files).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from hint_model import HintConfig, HintModel
from hint_model.checkpoint import read_config
from hint_platform.errors import UserError
from hint_platform.placement import inference_device, inference_dtype
from pipelines import SourceSpec, Tokenizer, load_tokenizer
from pipelines.tokenizer import HF_FILE, MODEL_FILE, SIDE_FILES

CONFIG = "config.json"
TOKENIZER = "tokenizer"
OPTIMIZER = "optimizer.safetensors"
DATA_FORMAT = "data_format.json"
FAMILIES = ("sni", "p3")  # DataFormat.family
MANIFEST = "manifest.json"
_PARTIAL, _OLD = ".partial-", ".old-"  # name.partial-XXXX: being written; name.old-XXXX: replaced


class ExportError(UserError):
    """An export that is missing, incomplete or damaged: the message names it and what is wrong."""


@dataclass(frozen=True)
class DataFormat:
    """The input format a model was trained on. `family`: `sni` (SNI's formats; C4's too: every
    text ends in EOS) or `p3` (the T0 mixture's: the hypernetwork reads the masked template, the
    model the prompt, neither ending in EOS, as t0_tasks.py has it); `input_eos`: whether the
    input and the hypernetwork text end in EOS (T5's layout); `formats`: the train sources'."""

    family: str = "sni"
    input_eos: bool = True
    formats: tuple[str, ...] = ()

    @classmethod
    def of_sources(cls, sources: list[dict]) -> DataFormat:
        """What a run's train sources (`data.train`) train its model on."""
        specs = [SourceSpec.from_dict(s) for s in sources]
        formats = tuple(sorted({s.format for s in specs}))
        # A mixture of P3 and SNI (or C4) is served as SNI, as every export was before this record:
        # a request is an instruction and an input, SNI's shape; a P3 prompt is such an input.
        if specs and all(s.is_p3 for s in specs):
            return cls("p3", False, formats)
        return cls("sni", True, formats)


def write(model: nn.Module, directory: str | Path, tokenizer_dir: str | Path,
          state_dict: dict[str, Tensor] | None = None,
          optimizer: tuple[dict[str, Tensor], dict[str, str]] | None = None,
          data_format: DataFormat | None = None) -> Path:
    """Saves `model` (or `state_dict`, e.g. gathered from FSDP shards), a copy of its tokenizer
    and, given as (tensors, metadata), the optimizer state, and the input format it was trained
    on; replaces an export already there."""
    directory = Path(directory).absolute()
    ours = (directory / MANIFEST).exists() or (directory / CONFIG).exists()
    if directory.is_dir() and any(directory.iterdir()) and not ours:
        raise ExportError(f"{directory}: exists and is not a model export; not replacing it")
    directory.parent.mkdir(parents=True, exist_ok=True)
    for left in _leftovers(directory):  # of a write that died
        shutil.rmtree(left, ignore_errors=True)
    partial = directory.with_name(f".{directory.name}{_PARTIAL}{uuid.uuid4().hex[:12]}")
    partial.mkdir()
    try:
        model.save_pretrained(partial, state_dict=state_dict)
        _copy_tokenizer(Path(tokenizer_dir), partial / TOKENIZER)
        if optimizer is not None:
            save_file(optimizer[0], str(partial / OPTIMIZER), metadata=optimizer[1])
        if data_format is not None:
            (partial / DATA_FORMAT).write_text(json.dumps(asdict(data_format), indent=2))
        _write_manifest(partial)
        _replace(partial, directory)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return directory


def _copy_tokenizer(source: Path, out: Path) -> None:
    """The tokenizer's files only: a tokenizer directory may be a whole model checkpoint."""
    out.mkdir()
    for name in SIDE_FILES:
        if (source / name).is_file():
            shutil.copyfile(source / name, out / name)
    load_tokenizer(source).save(out)


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in (MODEL_FILE, HF_FILE))


def _write_manifest(directory: Path) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        files[path.relative_to(directory).as_posix()] = {"bytes": path.stat().st_size,
                                                         "sha256": _sha256(path, sync=True)}
    (directory / MANIFEST).write_text(json.dumps({"format": "hint-export", "files": files}, indent=2))
    _fsync(directory / MANIFEST)


def _replace(partial: Path, directory: Path) -> None:
    """Renames `partial` to `directory`. An export already there moves aside first (a directory
    cannot be renamed over a full one); a crash between the two renames leaves no export, and
    the next write removes what is left."""
    old = None
    if directory.exists():
        old = directory.with_name(f".{directory.name}{_OLD}{partial.name.rsplit('-', 1)[1]}")
        directory.rename(old)
    partial.rename(directory)
    _fsync(directory.parent)
    if old is not None:
        shutil.rmtree(old)


def _leftovers(directory: Path) -> list[Path]:
    prefixes = (f".{directory.name}{_PARTIAL}", f".{directory.name}{_OLD}")
    if not directory.parent.is_dir():
        return []
    return sorted(p for p in directory.parent.iterdir() if p.name.startswith(prefixes))


def check(directory: str | Path, digests: bool = False) -> None:
    """Raises ExportError, naming `directory` and what is wrong, unless it is a complete export:
    a manifest, and every file it lists present at its size (and, with `digests`, its sha256)."""
    directory = Path(directory)
    manifest = directory / MANIFEST
    if not directory.is_dir():
        left = [p.name for p in _leftovers(directory)]
        hint = f" ({', '.join(left)} beside it: a write that was interrupted)" if left else ""
        raise ExportError(f"{directory}: no model export there{hint}")
    if not manifest.is_file():
        raise ExportError(f"{directory}: incomplete model export: no {MANIFEST}, which is written "
                          "last (the writer was interrupted, or the export predates manifests: "
                          "export it again)")
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{manifest}: not a valid export manifest ({e})") from None
    for name, entry in files.items():
        path = directory / name
        if not path.is_file():
            raise ExportError(f"{directory}: incomplete model export: {name} is missing")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise ExportError(f"{directory}: damaged model export: {name} has {size} bytes, "
                              f"{MANIFEST} says {entry['bytes']} (truncated or replaced)")
        if digests and _sha256(path) != entry["sha256"]:
            raise ExportError(f"{directory}: damaged model export: {name} does not match its "
                              f"sha256 in {MANIFEST}")


def is_export(directory: str | Path) -> bool:
    """A complete export (file sizes checked, not their digests)."""
    try:
        check(directory)
    except ExportError:
        return False
    return True


def tokenizer_dir(directory: str | Path) -> Path:
    """The tokenizer that goes with a model directory: an export's `tokenizer/`, or the directory
    itself where it holds `spiece.model` or `tokenizer.json` (a Hugging Face checkpoint, a
    tokenizer directory)."""
    directory = Path(directory)
    for candidate in (directory / TOKENIZER, directory):
        if _has_tokenizer(candidate):
            return candidate
    raise UserError(f"{directory}: no tokenizer ({MODEL_FILE} or {HF_FILE} in it or in {TOKENIZER}/)")


def model_config(directory: str | Path) -> HintConfig:
    """The export's model config, without reading its weights."""
    directory = Path(directory)
    if not (directory / CONFIG).is_file():
        raise UserError(f"{directory}: not a model export (no {CONFIG})")
    return read_config(directory)


def data_format(directory: str | Path) -> DataFormat:
    """The input format the export's model was trained on: SNI's when the export does not say
    (written before it recorded one, or not by training)."""
    path = Path(directory) / DATA_FORMAT
    if not path.is_file():
        return DataFormat()
    fields = json.loads(path.read_text())
    if fields["family"] not in FAMILIES:  # a newer version's: serving it as SNI would be wrong
        raise ExportError(f"{path}: input format family {fields['family']!r} is not one of "
                          f"{', '.join(FAMILIES)}")
    return DataFormat(fields["family"], fields["input_eos"], tuple(fields["formats"]))


def load(directory: str | Path, device: torch.device | str | None = None,
         dtype: torch.dtype | str | None = None) -> tuple[HintModel, Tokenizer]:
    """The exported model, in eval mode on `device` (default: `placement.inference_device()`, the
    GPU Ray assigned to this process) in `dtype` (default: bf16 on CUDA, fp32 on the CPU), and
    its tokenizer, once the export checked complete."""
    check(directory, digests=True)  # a clear error for a partial or damaged export
    device = torch.device(device) if device is not None else inference_device()
    with torch.device(device):  # parameters made there: no full fp32 copy in host memory
        model = HintModel.from_pretrained(directory)
    model = model.to(dtype=inference_dtype(device, dtype)).eval()
    return model, load_tokenizer(tokenizer_dir(directory))


def read_optimizer(directory: str | Path) -> tuple[dict[str, Tensor], dict[str, str]] | None:
    """The optimizer state an export carries (tensors, metadata), or None."""
    path = Path(directory) / OPTIMIZER
    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    return load_file(str(path)), metadata


def _sha256(path: Path, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
        if sync:  # on disk before the manifest says it is complete
            os.fsync(f.fileno())
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
