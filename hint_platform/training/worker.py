"""Training, a worker's side: the loop each Ray Train worker runs (training/driver.py explains
batches, the loss and resume). The worker builds the model, shards it (parallel.py), restores
the latest checkpoint, then steps through its shard of the data, reporting to Ray Train and
logging to MLflow (rank 0) every `train.log_every` steps, at checkpoints and at evaluations.
"""

from __future__ import annotations

import functools
import json
import math
import tempfile
from pathlib import Path
from typing import Any

import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from ray.train import Checkpoint
from torch import nn
from torch.distributed.fsdp import FSDPModule

from hint_model import HintModel
from hint_model.flops import generator_query_flops, input_flops, instruction_flops
from hint_model.loss import token_loss_sum
from hint_platform.config import ExperimentConfig, from_dict, model_config
from hint_platform import storage
from hint_platform.errors import TrainingError
from hint_platform.tracking.runs import RunLogger, use_login
from hint_platform.training.checkpoint import (
    export_model,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from hint_platform.training.optim import build_optimizer, build_scheduler, clip_gradients
from hint_platform.training.parallel import parallelize
from hint_platform.training.state import (TrainState, checkpoint_position, global_batches,
                                          max_over_ranks, passes)
from hint_platform.training.throughput import Throughput
from pipelines import load_tokenizer
from pipelines.collate import collate


def build_model(cfg: ExperimentConfig) -> HintModel:
    """The model `cfg.model` asks for. `init_from` is read by content: a `config.json` with a
    `model_type` is a Hugging Face checkpoint (T5, GPT-2, OPT, Llama, Mistral, Qwen2), anything
    else an export of this platform, loaded into the config's variant (what it drops or
    initialises is printed to the worker's log; training/preflight.py checked it and told the
    user before the run)."""
    section = cfg.model
    if section.init_from:
        hf = json.loads((Path(section.init_from) / "config.json").read_text())
        if hf.get("format") != "hint":
            return HintModel.from_hf_checkpoint(section.init_from, variant=section.variant,
                                                **{"max_target_len": cfg.data.max_target_len,
                                                   **section.overrides})
        model = HintModel.from_pretrained(section.init_from, variant=section.variant,
                                          **section.overrides)
        print(f"model.init_from {section.init_from} as {section.variant!r}: {model.load_report}")
        return model
    # Without `init_from` and an explicit `vocab_size`, the vocabulary is the tokenizer's.
    return HintModel(model_config(cfg, vocab_size=load_tokenizer(cfg.data.tokenizer).vocab_size))


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], z_loss: float = 0.0,
             causal: bool = False) -> torch.Tensor:
    """The summed token loss of a collated batch (cross-entropy, plus the z-loss if asked). In
    both layouts (pipelines.collate) the logits line up with the labels: T5's decoder reads the
    labels shifted right, a decoder-only model's batch is already its prompt and target."""
    # Without labels: the model would also compute a mean loss we don't use.
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    if not causal:
        inputs["decoder_input_ids"] = model.shift_right(batch["labels"])
    return token_loss_sum(model(**inputs).logits, batch["labels"], z_loss)


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[dict[str, torch.Tensor]], grad_clip: float,
               z_loss: float, causal: bool = False) -> dict[str, torch.Tensor]:
    """One optimizer step over this worker's micro-batches (already collated, on device).

    Each micro-batch's summed token loss is divided by the target tokens of the whole global
    batch (all ranks); FSDP averages gradients over ranks, so the loss is also scaled by the
    world size to make the reduced gradient the global mean's. Gradients are reduced once,
    after the last micro-batch. Nothing here waits for the device: the loss and the gradient
    norm come back as device scalars, which the caller reads only when it logs.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    tokens = sum((b["labels"] != -100).sum() for b in micro_batches).float()
    if dist.is_initialized():
        dist.all_reduce(tokens)
    summed = torch.zeros((), device=tokens.device)
    for i, batch in enumerate(micro_batches):
        if isinstance(model, FSDPModule):  # reduce gradients once, after the last micro-batch
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss = loss_sum(model, batch, z_loss, causal)
        (loss * (world / tokens)).backward()
        summed += loss.detach()
    grad_norm = clip_gradients(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if dist.is_initialized():
        dist.all_reduce(summed)
    return {"loss": summed / tokens, "grad_norm": grad_norm}


def eval_loss(model: nn.Module, rows: list[dict], micro: int, device: torch.device, pad_id: int = 0,
              causal: bool = False) -> float:
    """The mean token loss of `rows`, without dropout or gradients. The ranks take turns at the
    micro-batches and sum their losses and tokens. FSDP's forward is collective, so every rank
    runs as many: one past the last batch runs the first again and discards the result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = [rows[i:i + micro] for i in range(0, len(rows), micro)]
    sums = torch.zeros(2)  # summed loss, target tokens
    model.eval()
    with torch.no_grad():
        for i in range(rank, world * math.ceil(len(batches) / world), world):
            batch = to_device(batches[i % len(batches)], device, pad_id, causal)
            loss = loss_sum(model, batch, causal=causal)
            if i < len(batches):
                sums += torch.stack([loss.cpu(), (batch["labels"] != -100).sum().cpu().float()])
    reshard(model)
    model.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def reshard(model: nn.Module) -> None:
    """Back to the shards after forwards with no backward (an evaluation). FSDP modules that
    keep their gathered weights after forward (train.reshard_after_forward=false) free them
    only in backward: they would stay in memory through the export, which gathers the whole
    model once more, or until the next step's backward."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def to_device(rows: list[dict], device: torch.device, pad_id: int = 0,
              causal: bool = False) -> dict[str, torch.Tensor]:
    """A collated micro-batch on `device`; to a GPU from pinned memory, without waiting."""
    batch = collate(rows, pad_id, causal=causal)
    pin = device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=True) for k, v in batch.items()}


def _tokens(row: dict) -> int:
    return len(row["hyper_input_ids"]) + len(row["input_ids"]) + len(row["labels"])


def training_flops(config, micro_batches: list[list[dict]]) -> float:
    """Model FLOPs of training on these micro-batches (forward + backward = 3x forward),
    padding excluded. Each micro-batch encodes and generates once per distinct instruction,
    as HintModel runs it (pipelines.collate groups them)."""
    forward = 0.0
    for rows in micro_batches:
        instructions = {tuple(r["hyper_input_ids"]) for r in rows}
        forward += sum(instruction_flops(config, len(t)) for t in instructions)
        forward -= (len(instructions) - 1) * generator_query_flops(config)  # once per call
        forward += sum(input_flops(config, len(r["hyper_input_ids"]), len(r["input_ids"]),
                                   len(r["labels"])) for r in rows)
    return 3 * forward


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The loop each Ray Train worker runs (training/driver.py: batches, resume)."""
    cfg = from_dict(loop_config["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)  # same initial weights on every rank before sharding
    with device:  # initialised where it trains: an xl model's init on the CPU takes minutes
        model = build_model(cfg)
    # The unsharded model's config, kept before parallelize wraps the model (FSDP hides it).
    config = model.config
    model = parallelize(model, device=device, fsdp=t.fsdp,
                        activation_checkpointing=t.activation_checkpointing, compile=t.compile,
                        reshard_after_forward=t.reshard_after_forward)
    optimizer = build_optimizer(model, t)
    scheduler = build_scheduler(optimizer, t)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, model, optimizer, scheduler, config.to_dict())
    elif t.restore_optimizer and cfg.model.init_from:
        print(restore_optimizer(cfg.model.init_from, model, optimizer))
    # The batches' layout and padding follow the model and its tokenizer.
    causal, pad_id = config.is_decoder_only, load_tokenizer(cfg.data.tokenizer).pad_id
    use_login(ray.get(loop_config["mlflow_login"]))
    export_dir = loop_config["export_dir"]  # a path, or an object store URI: uploaded by rank 0
    # Metrics an outage kept from MLflow wait beside the export (local runs) for the next logger.
    unlogged_file = None if storage.is_uri(export_dir) else Path(export_dir).parent / "unlogged_metrics.jsonl"
    logger = RunLogger(loop_config["tracking_uri"], loop_config["run_id"], rank == 0,
                       retry_s=cfg.run.tracking_retry_s, unlogged_file=unlogged_file)
    micro = t.micro_batch_size
    accum = t.global_batch_size // (world * micro)
    meter = Throughput(device, world)
    model.train()
    evaluation = loop_config["eval_rows"]
    skipped = 0  # bad records the training stream skipped, as far as this rank has read
    metrics: dict[str, float] = {}
    board = loop_config["pass_board"]
    epochs = passes(ray.train.get_dataset_shard("train"), board, state, rank)
    steps = global_batches(epochs, state, micro, accum)
    while state.step < t.max_steps:
        micro_rows, waited = next(steps)
        try:
            out = train_step(model, optimizer, [to_device(r, device, pad_id, causal) for r in micro_rows],
                             t.grad_clip, t.z_loss, causal)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            raise TrainingError(
                f"out of memory at train.micro_batch_size={micro} on {device}: lower "
                "train.micro_batch_size (gradient accumulation keeps train.global_batch_size) "
                "or set train.activation_checkpointing=true") from e
        lr = scheduler.get_last_lr()[0]  # this step's
        scheduler.step()
        state.step += 1
        rows = [r for micro_batch in micro_rows for r in micro_batch]
        state.mark([r["example_index"] for r in rows])
        skipped = max(skipped, *(r["bad_records_skipped"] for r in rows))
        meter.add(len(rows), sum(map(_tokens, rows)), training_flops(config, micro_rows), waited)
        last = state.step == t.max_steps
        save = last or (t.checkpoint_every and state.step % t.checkpoint_every == 0)
        evaluate = bool(evaluation) and (last or (t.eval_every and state.step % t.eval_every == 0))
        if not (save or evaluate or state.step % t.log_every == 0):
            continue
        out = {k: float(v) for k, v in out.items()}  # the one wait for the device, at log steps
        if not math.isfinite(out["loss"]):
            raise TrainingError(f"loss is {out['loss']} at step {state.step}; "
                                "lower train.lr or check the data")
        metrics = {**out, **meter.summary(), "lr": lr,
                   "epoch": float(state.epoch), "step": state.step,
                   "data_bad_records_skipped": max_over_ranks(skipped)}
        # Every rank reads its rows in stream order: none before the lowest of the ranks' last
        # is left to train, and the board lets go of the positions before it (its memory).
        reached = -max_over_ranks(-max(r["example_index"] for r in rows))
        if rank == 0:
            board.position_at.remote(state.epoch, reached)
        if evaluate:
            metrics["eval_loss"] = eval_loss(model, evaluation, micro, device, pad_id, causal)
            meter.restart()  # evaluation time is not training throughput
        logger.log_metrics(metrics, step=state.step)
        if save:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(directory, model, optimizer, scheduler, state, config.to_dict(),
                                data_position=functools.partial(checkpoint_position, board))
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
    with storage.local_dir(export_dir, upload=rank == 0) as local:
        export_model(model, local, cfg.data.tokenizer, optimizer, state.step, sources=cfg.data.train)
        unlogged = logger.close({"export": local})
    if rank:
        return None
    return {"export_dir": str(export_dir), "steps_done": state.step, "unlogged": unlogged}
