"""Training checkpoints and the final export.

A checkpoint directory holds
  - the model and optimizer state, sharded: `torch.distributed.checkpoint` (DCP) files, one
    per rank (`__<rank>_0.distcp`) plus `.metadata`; each rank saves into its own directory
    and Ray Train merges them into one checkpoint;
  - `train_state.safetensors` (rank 0): the step, the epoch and the data position, a bitmap
    over `example_index` of the examples consumed in the current epoch, gathered from all ranks;
  - `model_config.json` (rank 0): the model's HintConfig, checked before loading so that a
    checkpoint of another model shape is refused with a clear error;
  - `scheduler.json` (rank 0): the learning-rate schedule's state (the step it is at);
  - `data_position.json` (rank 0, when the stream gave one): where the pass's stream is read
    from again on resume (training/driver.py), at or before the first example not consumed.
No pickle: tensors go through DCP and safetensors, the rest is JSON.

`export_model` gathers the trained weights for the export (its layout: hint_platform/export.py),
with Adafactor's state, which `restore_optimizer` sets again when a later stage starts from the
export (the reference restores the optimizer state between stages: t5x's full_restore.gin).
AdamW's state, twice the model, is not carried. The export records the input format of the
run's train sources (`export.DataFormat`), which serving builds again.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from safetensors.torch import load, load_file, save_file
from torch import nn
from torch.optim.lr_scheduler import LRScheduler
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

from hint_platform import export, storage
from hint_platform.errors import UserError
from hint_platform.training.optim import Adafactor
from hint_platform.training.state import TrainState

TRAIN_STATE = "train_state.safetensors"
MODEL_CONFIG = "model_config.json"
SCHEDULER = "scheduler.json"
DATA_POSITION = "data_position.json"


class ResumeError(UserError):
    """A checkpoint that cannot be resumed from: the message names the directory and why."""


def save_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler, state: TrainState, model_config: dict,
                    data_position: Callable[[TrainState], dict | None] | None = None) -> None:
    """Collective: every rank calls it with its own `directory` (Ray Train merges them).
    `data_position(state)`, called on rank 0 once `state` is gathered: the stream's position."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(directory))
    state.gather()
    if not dist.is_initialized() or dist.get_rank() == 0:
        save_file({"step": torch.tensor([state.step]), "epoch": torch.tensor([state.epoch]),
                   "consumed": state.consumed.to(torch.uint8)}, str(directory / TRAIN_STATE))
        (directory / MODEL_CONFIG).write_text(json.dumps(model_config, indent=2, sort_keys=True))
        (directory / SCHEDULER).write_text(json.dumps(scheduler.state_dict()))
        position = data_position(state) if data_position else None
        if position is not None:
            (directory / DATA_POSITION).write_text(json.dumps(position))


def load_checkpoint(directory: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    scheduler: LRScheduler, model_config: dict) -> TrainState:
    """Restores model, optimizer and schedule in place (collective) and returns the train state."""
    directory = Path(directory)
    for name in (TRAIN_STATE, MODEL_CONFIG, SCHEDULER, ".metadata"):
        if not (directory / name).is_file():
            raise ResumeError(f"checkpoint {directory}: {name} is missing; "
                                  "not a checkpoint of `hint train`, or an incomplete one")
    try:
        saved_config = json.loads((directory / MODEL_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ResumeError(f"checkpoint {directory}/{MODEL_CONFIG}: corrupt JSON: {e}") from None
    differs = sorted(k for k in set(saved_config) | set(model_config)
                     if saved_config.get(k) != model_config.get(k))
    if differs:
        detail = ", ".join(f"{k}: checkpoint {saved_config.get(k)!r} vs run "
                           f"{model_config.get(k)!r}" for k in differs[:5])
        raise ResumeError(f"checkpoint {directory} is of another model ({detail}); "
                              "use another run name or storage path to start afresh")
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state_dict = {"model": model_sd, "optim": optim_sd}
    try:
        dcp.load(state_dict, checkpoint_id=str(directory))
    except (Exception, CheckpointException) as e:  # DCP's is a BaseException
        raise ResumeError(f"checkpoint {directory} cannot be loaded: "
                              f"{type(e).__name__}: {e}") from e
    set_state_dict(model, optimizer, model_state_dict=state_dict["model"],
                   optim_state_dict=state_dict["optim"])
    scheduler.load_state_dict(json.loads((directory / SCHEDULER).read_text()))
    for group, lr in zip(optimizer.param_groups, scheduler.get_last_lr()):
        group["lr"] = lr  # the next step's rate, whatever the optimizer state carried
    return _read_train_state(directory)


def _read_train_state(directory: Path) -> TrainState:
    return _train_state(lambda: load_file(str(directory / TRAIN_STATE)), directory)


def _train_state(read, where) -> TrainState:
    try:
        saved = read()
        return TrainState(step=int(saved["step"]), epoch=int(saved["epoch"]),
                          consumed=saved["consumed"].bool())
    except Exception as e:
        raise ResumeError(f"checkpoint {where}: {TRAIN_STATE} cannot be read: "
                              f"{type(e).__name__}: {e}") from e


def latest_train_state(run_dir: str) -> TrainState | None:
    """The train state of the run's latest registered checkpoint, as Ray Train's checkpoint
    manager recorded it (the same checkpoint `ray.train.get_checkpoint()` gives the workers),
    or None before the first checkpoint. `run_dir` is a path or an object store URI."""
    snapshot = storage.read_bytes(f"{run_dir}/checkpoint_manager_snapshot.json")
    if snapshot is None:
        return None
    latest = json.loads(snapshot).get("latest_checkpoint_result")
    if not latest:
        return None
    where = f"{run_dir}/{latest['checkpoint_dir_name']}"
    saved = storage.read_bytes(f"{where}/{TRAIN_STATE}")
    if saved is None:
        raise ResumeError(f"checkpoint {where}: {TRAIN_STATE} is missing")
    state = _train_state(lambda: load(saved), where)
    position = storage.read_bytes(f"{where}/{DATA_POSITION}")  # none: the pass is read from its start
    try:
        state.position = json.loads(position) if position is not None else None
    except json.JSONDecodeError as e:
        raise ResumeError(f"checkpoint {where}/{DATA_POSITION}: corrupt JSON: {e}") from None
    return state


def export_model(model: nn.Module, directory: str | Path, tokenizer_dir: str | Path,
                 optimizer: torch.optim.Optimizer | None = None, step: int = 0,
                 sources: list[dict] | None = None) -> None:
    """Collective: gathers the full state dict (and an Adafactor's state) to rank 0, on CPU,
    which writes the export; `step` is the training step it was taken at, `sources` the run's
    train sources (data.train), whose input format the export records for serving."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                 cpu_offload=True))
    carried = None
    if isinstance(optimizer, Adafactor):
        carried = (optimizer.full_state(model), {"optimizer": "adafactor", "step": str(step)})
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    data_format = None if sources is None else export.DataFormat.of_sources(sources)
    export.write(model, directory, tokenizer_dir, state_dict=full, optimizer=carried, data_format=data_format)


def restore_optimizer(directory: str | Path, model: nn.Module,
                      optimizer: torch.optim.Optimizer) -> str:
    """Sets the optimizer state the export in `directory` carries, for every parameter of the
    model it matches by name and shape (an export of another variant restores what matches);
    the others start fresh. Returns what it did, for the log. The stage's own step count starts
    at 0 (train.max_steps counts this stage); Adafactor's per-parameter step counters, which
    set its decay and step size, go on from the export's, as t5x's global step does."""
    carried = export.read_optimizer(directory)
    if carried is None:
        return f"{directory} carries no optimizer state: the optimizer starts fresh"
    tensors, info = carried
    if not isinstance(optimizer, Adafactor):
        return (f"{directory} carries {info.get('optimizer')} state, this stage does not use "
                "adafactor: the optimizer starts fresh")
    restored = optimizer.load_full_state(model, tensors)
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    fresh = sorted(set(trainable) - set(restored))
    said = (f"optimizer state of {directory} (step {info.get('step')}) restored for "
            f"{len(restored)} of {len(trainable)} trainable tensors")
    more = f" and {len(fresh) - 5} more" if len(fresh) > 5 else ""
    return said + (f"; fresh: {', '.join(fresh[:5])}{more}" if fresh else "")
