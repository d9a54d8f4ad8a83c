"""Training: `fit(cfg)` runs a Ray Train (V2) `TorchTrainer` whose workers each build the model,
shard it (parallel.py), and train on their shard of one Ray Dataset.

Batches. A step is one optimizer update on `train.global_batch_size` examples: every worker
runs `accum = global / (num_workers * micro_batch_size)` micro-batches and the gradients are
summed. The loss is the mean over every target token of the global batch (not a mean of
per-micro-batch means), so a step's gradient does not depend on how the batch is split over
workers and micro-batches: 2-worker FSDP and one process give the same update.

Data position and resume. Rows carry a deterministic `example_index`. Each rank records the
indices it trained; a checkpoint stores their union over ranks (a bitmap over the current
epoch) with the step and the epoch. Workers read two datasets: `train_remainder`, built by Ray
Train at every start of the worker group (first, after a failure, or a restarted run of the
same name and storage path) as the rows of the latest checkpoint's epoch minus its bitmap, then
`train` (all rows) for each later epoch. Both are split equally over the workers. Each worker
also drops any row in its checkpoint's bitmap as it streams (a guard; the split is then no
longer equal, which only happens if Ray's record and the files disagree).
Granularity: the checkpoint. Steps after the last checkpoint are redone on examples not in its
bitmap, none is trained twice in an epoch's accounting, none skipped. An epoch ends when a
worker cannot fill one more step: the last (fewer than global_batch_size) rows of each epoch
are not trained (drop-last). Every epoch streams the rows in the same seeded order.

Metrics. Every `train.log_every` steps (and at checkpoints) rank 0 logs to MLflow and every
rank reports to Ray Train: the step's loss and gradient norm, throughput, the epoch, and
`data_bad_records_skipped` (records the training stream skipped so far, the largest count any
rank has seen). Every `train.eval_every` steps and at the end, with `data.eval` sources, the
same report carries `eval_loss`: the mean token loss of the first `train.eval_examples`
examples of data.eval (read once, on the driver), what Tune's schedulers rank trials on.
"""

from __future__ import annotations

import glob
import itertools
import math
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from ray.data.collate_fn import NumpyBatchCollateFn
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.fsdp import FSDPModule

from hint_platform import tracking
from hint_platform.checkpoint import (TrainState, export_model, latest_train_state,
                                     load_checkpoint, save_checkpoint)
from hint_platform.config import ConfigError, ExperimentConfig, from_dict
from hint_platform.errors import UserError
from hint_platform.optim import build_optimizer, clip_gradients
from hint_platform.parallel import parallelize
from hint_platform.throughput import Throughput

ROW_KEYS = ("hyper_input_ids", "input_ids", "labels", "example_index", "bad_records_skipped")
PAD_ID = 0


class TrainingError(UserError):
    """A run that cannot go on for a reason the user can fix (memory, data size)."""


class DataError(UserError):
    """A training record that cannot be used: the message names the file and line."""


@dataclass
class TrainResult:
    run_dir: str
    export_dir: str | None
    checkpoint_path: str | None
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    steps_done: int = 0


def fit(cfg: ExperimentConfig, *, run_config_callbacks: list | None = None) -> TrainResult:
    """Trains `cfg` on the current Ray (started locally if needed) and exports the model.

    A run named `cfg.name` that exists under `cfg.run.storage_path` is resumed from its latest
    checkpoint. Bad inputs (data paths, tokenizer, `model.init_from`, tracking URI) fail here,
    before any worker starts.
    """
    import ray
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    cfg = _resolved(cfg)
    uri = tracking.resolve_tracking_uri(cfg)
    tracking.check_reachable(uri)  # and that it lets us in: before reading data or starting Ray
    evaluation = eval_rows(cfg)
    storage = tracking.storage_dir(cfg)
    run_id = tracking.open_run(cfg, uri)
    # Reports wait on the controller's poll (default 2 s); the driver's value reaches the
    # controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        start_ray()
    run_dir = storage / cfg.name
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "tracking_uri": uri, "run_id": run_id,
                           "export_dir": str(run_dir / "export"), "eval_rows": evaluation},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers,
                                     use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        run_config=RunConfig(name=cfg.name, storage_path=str(storage),
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=run_config_callbacks),
        datasets={"train": training_dataset(cfg), "train_remainder": RemainingEpoch(cfg, run_dir)},
        # Ray Train replaces the datasets' execution options: keep their deterministic order
        # (what makes a resumed run see the rows an uninterrupted one would).
        dataset_config=DataConfig(datasets_to_split=["train", "train_remainder"],
                                  execution_options=_ordered()),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        tracking.close_run(uri, run_id, ok=False)
        raise _user_error_in(e) or e
    tracking.close_run(uri, run_id, ok=True)
    final = result.return_value or {}
    return TrainResult(
        run_dir=str(result.path),
        export_dir=final.get("export_dir"),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        metrics=dict(result.metrics or {}),
        mlflow_run_id=run_id,
        steps_done=int(final.get("steps_done", 0)),
    )


def start_ray(**init_args) -> None:
    """Joins the cluster in RAY_ADDRESS, else starts Ray here with its dashboard on loopback
    (Ray's default, made explicit: to share it, start Ray yourself with `ray start --head
    --dashboard-host ADDRESS` and set RAY_ADDRESS); says where the dashboard listens."""
    import ray

    if not os.environ.get("RAY_ADDRESS"):
        init_args.setdefault("dashboard_host", "127.0.0.1")
    context = ray.init(log_to_driver=False, **init_args)
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)


def _ordered():
    from ray.train import DataConfig

    options = DataConfig.default_ingest_options()
    options.preserve_order = True
    return options


def _resolved(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` with its paths checked and made absolute: workers run in other directories.
    Bad paths fail here, on the driver, before any worker starts."""
    if not cfg.data.train:
        raise ConfigError("data.train: no training sources")
    absolute = {}
    for i, spec in enumerate(cfg.data.train):
        path = spec.get("path")
        if path and "://" not in str(path):
            if not (glob.glob(path) if glob.has_magic(path) else Path(path).exists()):
                raise ConfigError(f"data.train[{i}].path: {path} does not exist (or matches no file)")
            absolute.setdefault("data.train", [dict(s) for s in cfg.data.train])[i]["path"] = os.path.abspath(path)
    if not cfg.data.tokenizer or not Path(cfg.data.tokenizer).is_dir():
        raise ConfigError(f"data.tokenizer: {cfg.data.tokenizer!r} is not a directory")
    absolute["data.tokenizer"] = str(Path(cfg.data.tokenizer).resolve())
    if cfg.model.init_from:
        if not (Path(cfg.model.init_from) / "config.json").is_file():
            raise ConfigError(f"model.init_from: {cfg.model.init_from} has no config.json; "
                              "expected a Hugging Face T5 checkpoint or the export of a run")
        absolute["model.init_from"] = str(Path(cfg.model.init_from).resolve())
    if cfg.data.eval and cfg.train.eval_examples <= 0:
        raise ConfigError(f"train.eval_examples: must be positive, got {cfg.train.eval_examples}")
    if not cfg.train.fsdp and cfg.train.num_workers > 1:
        raise ConfigError("train.fsdp=false trains in one process: set train.num_workers=1")
    absolute["run.storage_path"] = str(tracking.storage_dir(cfg))
    return cfg.with_overrides(absolute)


def _user_error_in(error: BaseException) -> UserError | None:
    """The first UserError a worker raised, out of Ray Train's wrappers; a bad data record
    (data.on_bad_record: error) becomes one, its message naming the file and line."""
    from pipelines import BadRecordError

    seen = [error, *getattr(error, "worker_failures", {}).values()]
    for e in seen:
        while e is not None:
            if isinstance(e, UserError):
                return e
            if type(e) is BadRecordError:  # not Ray's RayTaskError(BadRecordError): a traceback
                return DataError(f"training data: {e}")
            e = e.__cause__ or getattr(e, "cause", None)
    return None


def build_model(cfg: ExperimentConfig) -> nn.Module:
    """The model `cfg.model` asks for. `init_from` is read by content: a `config.json` with
    `model_type: t5` is a Hugging Face T5 checkpoint, anything else an export of this platform.
    Without `init_from` and an explicit `vocab_size`, the vocabulary is the tokenizer's."""
    import json

    from hint_model import HintConfig, HintModel
    from pipelines import load_tokenizer

    section = cfg.model
    if section.init_from:
        hf = json.loads((Path(section.init_from) / "config.json").read_text())
        if hf.get("model_type") == "t5":
            return HintModel.from_t5_checkpoint(section.init_from, variant=section.variant,
                                                **section.overrides)
        model = HintModel.from_pretrained(section.init_from)
        if model.config.variant != section.variant:
            raise ConfigError(f"model.variant: {section.variant!r}, but model.init_from "
                              f"{section.init_from} holds a {model.config.variant!r} model")
        return model
    overrides = dict(section.overrides)
    overrides.setdefault("vocab_size", load_tokenizer(cfg.data.tokenizer).vocab_size)
    return HintModel(HintConfig.preset(section.preset, variant=section.variant, **overrides))


def eval_rows(cfg: ExperimentConfig) -> list[dict]:
    """The first `train.eval_examples` rows of `data.eval` (none without eval sources), read on
    the driver: a bad eval source fails before any worker starts, and every rank evaluates
    the same rows however often the workers restart."""
    from pipelines import iter_records

    data = cfg.data
    if not data.eval:
        return []
    rows = iter_records(data.eval, data.tokenizer, max_input_len=data.max_input_len,
                        max_hyper_len=data.max_hyper_len, max_target_len=data.max_target_len,
                        on_bad_record=data.on_bad_record, seed=data.seed)
    keys = ("hyper_input_ids", "input_ids", "labels")
    kept = [{k: row[k] for k in keys} for row in itertools.islice(rows, cfg.train.eval_examples)]
    if not kept:
        raise ConfigError("data.eval: the sources hold no examples")
    return kept


def training_dataset(cfg: ExperimentConfig):
    """The training rows as a Ray Dataset (lazy: reading and tokenising run as it streams)."""
    from pipelines import SourceSpec, build_dataset

    data = cfg.data
    return build_dataset(
        [SourceSpec.from_dict(s) for s in data.train], data.tokenizer,
        max_input_len=data.max_input_len, max_hyper_len=data.max_hyper_len,
        max_target_len=data.max_target_len, on_bad_record=data.on_bad_record, seed=data.seed)


class RemainingEpoch:
    """The rest of the epoch the run's latest checkpoint is in: the training rows without the
    examples it consumed. Ray Train calls it at every start of the worker group, first or after
    a failure, so the rows left are split equally over the workers."""

    def __init__(self, cfg: ExperimentConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir

    def __call__(self):
        dataset = training_dataset(self.cfg)
        state = latest_train_state(self.run_dir)
        if state is None or not state.num_consumed():
            return dataset
        return dataset.map_batches(_drop_consumed, batch_format="pyarrow",
                                   fn_kwargs={"consumed": state.consumed.numpy()})


def _drop_consumed(block, consumed: np.ndarray):
    import pyarrow as pa

    index = block["example_index"].to_numpy()
    seen = np.zeros(len(index), dtype=bool)
    known = index < len(consumed)
    seen[known] = consumed[index[known]]
    return block.filter(pa.array(~seen))


class RowsOf(NumpyBatchCollateFn):
    """collate_fn for `iter_torch_batches`: a numpy batch -> the rows the loop still needs
    (those not consumed before a resume), as plain int lists. Padding happens per micro-batch
    in the loop, once the rows of a full micro-batch are known."""

    def __init__(self, consumed: TrainState):
        self.consumed = consumed

    def __call__(self, batch: dict[str, np.ndarray]) -> list[dict[str, Any]]:
        rows = []
        for i in range(len(batch["example_index"])):
            if not self.consumed.is_consumed(int(batch["example_index"][i])):
                rows.append({k: np.asarray(batch[k][i]).tolist() for k in ROW_KEYS})
        return rows


def global_batches(epochs: Iterator, state: TrainState, micro: int, accum: int
                   ) -> Iterator[tuple[list[list[dict]], float]]:
    """Yields (this worker's `accum` micro-batches of `micro` rows, seconds waited for them),
    step after step, over the dataset shards of `epochs` in turn; `state.epoch` and
    `state.consumed` follow the epochs."""
    empty_epochs = 0
    for shard in epochs:
        batches = shard.iter_torch_batches(batch_size=micro, collate_fn=RowsOf(state),
                                           prefetch_batches=2)
        rows = (row for batch in batches for row in batch)
        stepped = False
        while True:
            start = time.perf_counter()
            taken = [row for _, row in zip(range(micro * accum), rows)]
            waited = time.perf_counter() - start
            if not _all_ranks(len(taken) == micro * accum):
                break
            stepped = True
            yield [taken[i:i + micro] for i in range(0, len(taken), micro)], waited
        empty_epochs = 0 if stepped else empty_epochs + 1
        if empty_epochs == 2:  # a whole fresh epoch without one step: too little data
            raise TrainingError(
                f"the training data has fewer examples than one step needs "
                f"(train.global_batch_size); each of the workers needs {micro * accum}")
        state.epoch += 1
        state.consumed = torch.zeros(0, dtype=torch.bool)


def _all_ranks(flag: bool) -> bool:
    if not dist.is_initialized():
        return flag
    t = torch.tensor([int(flag)])
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def _max_over_ranks(value: int) -> int:
    if not dist.is_initialized():
        return value
    t = torch.tensor([value])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def _loss_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The summed token loss of a collated batch."""
    # decoder inputs without labels: the model would also compute a mean loss we don't use
    logits = model(**batch, decoder_input_ids=model.shift_right(batch["labels"])).logits
    return F.cross_entropy(logits.float().flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=-100, reduction="sum")


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               micro_batches: list[dict[str, torch.Tensor]], grad_clip: float) -> dict[str, float]:
    """One optimizer step over this worker's micro-batches (already collated, on device).

    Each micro-batch's summed token loss is divided by the target tokens of the whole global
    batch (all ranks); FSDP averages gradients over ranks, so the loss is also scaled by the
    world size to make the reduced gradient the global mean's.
    """
    world = dist.get_world_size() if dist.is_initialized() else 1
    tokens = torch.tensor([float(sum(int((b["labels"] != -100).sum()) for b in micro_batches))])
    if dist.is_initialized():
        dist.all_reduce(tokens)
    total_tokens = tokens.item()
    loss_sum = torch.zeros(())
    for i, batch in enumerate(micro_batches):
        if isinstance(model, FSDPModule):  # reduce gradients once, after the last micro-batch
            model.set_requires_gradient_sync(i == len(micro_batches) - 1)
        loss = _loss_sum(model, batch)
        (loss * (world / total_tokens)).backward()
        loss_sum += loss.detach().cpu()
    grad_norm = clip_gradients(model, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    return {"loss": loss_sum.item() / total_tokens, "grad_norm": grad_norm}


def eval_loss(model: nn.Module, rows: list[dict], micro: int, device: torch.device) -> float:
    """The mean token loss of `rows`, without dropout or gradients. The ranks take turns at the
    micro-batches and sum their losses and tokens. FSDP's forward is collective, so every rank
    runs as many: one past the last batch runs the first again and discards the result."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    batches = [rows[i:i + micro] for i in range(0, len(rows), micro)]
    sums = torch.zeros(2)  # summed loss, target tokens
    model.eval()
    with torch.no_grad():
        for i in range(rank, world * math.ceil(len(batches) / world), world):
            batch = _to_device(batches[i % len(batches)], device)
            loss = _loss_sum(model, batch)
            if i < len(batches):
                sums += torch.stack([loss.cpu(), (batch["labels"] != -100).sum().cpu().float()])
    model.train()
    if dist.is_initialized():
        dist.all_reduce(sums)
    return (sums[0] / sums[1]).item()


def _to_device(rows: list[dict], device: torch.device) -> dict[str, torch.Tensor]:
    from pipelines import collate

    batch = collate(rows, pad_id=PAD_ID)
    keys = ("hyper_input_ids", "hyper_attention_mask", "input_ids", "attention_mask", "labels")
    return {k: batch[k].to(device, non_blocking=True) for k in keys}


def _tokens(row: dict) -> int:
    return len(row["hyper_input_ids"]) + len(row["input_ids"]) + len(row["labels"])


def training_flops(model_config, rows: list[dict]) -> float:
    """Model FLOPs of training on `rows` (forward + backward = 3x forward), padding excluded."""
    from hint_model.flops import forward_flops

    return 3 * sum(forward_flops(model_config, len(r["hyper_input_ids"]), len(r["input_ids"]),
                                 len(r["labels"])) for r in rows)


def _out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "can't allocate memory" in str(error)


def train_loop_per_worker(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """The loop each Ray Train worker runs (module docstring: batches, resume)."""
    import ray.train
    from ray.train import Checkpoint

    cfg = from_dict(loop_config["config"])
    t = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(t.seed)  # same initial weights on every rank before sharding
    model = build_model(cfg)
    model_config = model.config.to_dict()
    model = parallelize(model, device=device, fsdp=t.fsdp,
                        activation_checkpointing=t.activation_checkpointing)
    optimizer = build_optimizer(model, t)
    state = TrainState()
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_checkpoint(directory, model, optimizer, model_config)
    logger = tracking.RunLogger(loop_config["tracking_uri"], loop_config["run_id"], rank == 0)
    micro = t.micro_batch_size
    accum = t.global_batch_size // (world * micro)
    meter = Throughput(device, world)
    model.train()
    evaluation = loop_config["eval_rows"]
    skipped = 0  # bad records the training stream skipped, as far as this rank has read
    metrics: dict[str, float] = {}
    epochs = itertools.chain([ray.train.get_dataset_shard("train_remainder")],
                             itertools.repeat(ray.train.get_dataset_shard("train")))
    steps = global_batches(epochs, state, micro, accum)
    while state.step < t.max_steps:
        micro_rows, waited = next(steps)
        try:
            out = train_step(model, optimizer, [_to_device(r, device) for r in micro_rows],
                             t.grad_clip)
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not _out_of_memory(e):
                raise
            raise TrainingError(
                f"out of memory at train.micro_batch_size={micro} on {device}: lower "
                "train.micro_batch_size (gradient accumulation keeps train.global_batch_size) "
                "or set train.activation_checkpointing=true") from e
        if not math.isfinite(out["loss"]):
            raise TrainingError(f"loss is {out['loss']} at step {state.step + 1}; "
                                "lower train.lr or check the data")
        state.step += 1
        rows = [r for micro_batch in micro_rows for r in micro_batch]
        state.mark([r["example_index"] for r in rows])
        skipped = max(skipped, *(r["bad_records_skipped"] for r in rows))
        meter.add(len(rows), sum(map(_tokens, rows)), training_flops(model.config, rows), waited)
        last = state.step == t.max_steps
        save = last or (t.checkpoint_every and state.step % t.checkpoint_every == 0)
        evaluate = bool(evaluation) and (last or (t.eval_every and state.step % t.eval_every == 0))
        if not (save or evaluate or state.step % t.log_every == 0):
            continue
        metrics = {**out, **meter.summary(), "epoch": float(state.epoch), "step": state.step,
                   "data_bad_records_skipped": _max_over_ranks(skipped)}
        if evaluate:
            metrics["eval_loss"] = eval_loss(model, evaluation, micro, device)
            meter.restart()  # evaluation time is not training throughput
        logger.log_metrics(metrics, step=state.step)
        if save:
            with tempfile.TemporaryDirectory() as directory:
                save_checkpoint(directory, model, optimizer, state, model_config)
                ray.train.report(metrics, checkpoint=Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
    export_dir = loop_config["export_dir"]
    export_model(model, export_dir, cfg.data.tokenizer)
    logger.log_artifacts(export_dir, "export")
    logger.close()
    return {"export_dir": export_dir, "steps_done": state.step} if rank == 0 else None
