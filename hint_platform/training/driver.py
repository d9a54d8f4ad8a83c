"""Training, the driver's side: `fit(cfg)` checks the config against the machine, opens the
MLflow run and runs a Ray Train (V2) `TorchTrainer` whose workers run training/worker.py.

Batches. A step is one optimizer update on `train.global_batch_size` examples: every worker
runs `accum = global / (num_workers * micro_batch_size)` micro-batches and the gradients are
summed. The loss (cross-entropy plus `train.z_loss`, hint_model/loss.py) is the mean over every
target token of the global batch (not a mean of per-micro-batch means), so a step's gradient does not depend on how the batch is split over
workers and micro-batches: 2-worker FSDP and one process give the same update.

Data position and resume. Every pass (epoch) over the training sources has its own shuffle and
mixing (pipelines/dataset.py, seeded by the pass), and rows carry their pass (`epoch`) and a
deterministic `example_index` within it. Each rank records the indices it trained; a checkpoint
stores their union over ranks (a bitmap over the current pass) with the step and the pass
(training/state.py). Workers read one dataset, `train`, once per pass: Ray Train builds it at
every start of the worker group (first, after a failure, or a restarted run of the same name
and storage path), and each of its executions reads the pass rank 0 wrote on a `PassBoard`
actor before asking for it. It is split equally over the workers.
Resume without re-reading: the stream of a pass is a deterministic state machine (the mixer's
random state, each task's place, C4's file, byte offset, packing buffer: pipelines/mixing.py),
and the read task records its position at the start of every block of BLOCK_ROWS rows on the
board. A checkpoint saves, with the gathered bitmap, the last recorded position at or before
P, the first example_index of the pass that no rank consumed (`data_position.json`). A resumed
dataset is the stream from that position (nothing before it read or tokenised: every row
before P was consumed, so none is skipped), without the rows of the bitmap (those at or after
the position that some rank had consumed: none is trained twice). It holds exactly the rows
the old full re-read with the bitmap filter gave, in the same blocks (positions are at block
starts), so Ray's split and the rows each step trains are those of an uninterrupted run. Cost:
building the pass (reading the SNI task files and P3 records, as every pass does to know the
tasks' sizes), at most one C4 file decompressed up to the offset, and the rows between the
position and P (rows the slowest rank had not trained, and up to one block); not the step.
Each worker also drops any row in its checkpoint's bitmap as
it streams (a guard; the split is then no longer equal, which only happens if Ray's record and
the files disagree). A checkpoint without a position (one written before positions were, or
when the board held none for its pass) is resumed by reading its pass from the start.
Granularity: the checkpoint. Steps after the last checkpoint are redone on examples not in its
bitmap, none is trained twice in a pass's accounting, none skipped. A pass ends when a worker
cannot fill one more step: the last (fewer than global_batch_size) rows of each pass are not
trained (drop-last).

Evaluation during training. With `data.eval` sources, the first `train.eval_examples` examples
are read once, here on the driver, and every rank evaluates the same rows (`eval_loss`, what
Tune's schedulers rank trials on).
"""

from __future__ import annotations

import itertools
import os
import sys
from dataclasses import dataclass, field

import ray
import requests
from mlflow.exceptions import MlflowException
from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchConfig, TorchTrainer
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from hint_platform.config import ConfigError, ExperimentConfig, is_decoder_only
from hint_platform.errors import DataError, UserError
from hint_platform.redact import split_credentials
from hint_platform.tracking import runs
from hint_platform.training.board import BoardEpoch, BoardRecord, PassBoard, drop_consumed
from hint_platform.training.checkpoint import latest_train_state
from hint_platform.training.preflight import resolve
from hint_platform.training.worker import train_loop_per_worker
from pipelines import BadRecordError, SourceSpec, build_dataset, iter_records


@dataclass
class TrainResult:
    run_dir: str
    export_dir: str | None
    checkpoint_path: str | None
    tracking_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    steps_done: int = 0
    unlogged: list[str] = field(default_factory=list)  # what MLflow did not get, said in words


def start_ray(**init_args) -> None:
    """Joins the cluster in RAY_ADDRESS, else starts Ray here with its dashboard on loopback
    (Ray's default, made explicit: to share it, start Ray yourself with `ray start --head
    --dashboard-host ADDRESS` and set RAY_ADDRESS); says where the dashboard listens."""
    if not os.environ.get("RAY_ADDRESS"):
        init_args.setdefault("dashboard_host", "127.0.0.1")
    context = ray.init(log_to_driver=False, **init_args)
    if context.dashboard_url:
        print(f"Ray dashboard: http://{context.dashboard_url}", flush=True)


def fit(cfg: ExperimentConfig, *, run_config_callbacks: list | None = None) -> TrainResult:
    """Trains `cfg` on the current Ray (started locally if needed) and exports the model.

    A run named `cfg.name` that exists under `cfg.run.storage_path` is resumed from its latest
    checkpoint. Bad inputs (data paths, tokenizer, `model.init_from`, the model section,
    tracking URI) fail here, before any worker starts (training/preflight.py).
    """
    cfg = resolve(cfg)
    uri = runs.resolve_tracking_uri(cfg)
    runs.check_reachable(uri)  # and that it lets us in: before reading data or starting Ray
    evaluation = eval_rows(cfg)
    storage = runs.storage_root(cfg)  # a path or an object store URI (hint_platform/storage.py)
    run_id = runs.open_run(cfg, uri)
    # Reports wait on the controller's poll (default 2 s); the driver's value reaches the
    # controller and workers.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
    if not ray.is_initialized():
        start_ray()
    run_dir = f"{storage}/{cfg.name}"
    # On this driver's node, as Ray Train's controller: losing a worker node must not take the
    # board (and the pass it holds) with it.
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    board = PassBoard.options(scheduling_strategy=here).remote()
    ingest = DataConfig.default_ingest_options()
    # Ray Train replaces the datasets' execution options: keep their deterministic order
    # (what makes a resumed run see the rows an uninterrupted one would).
    ingest.preserve_order = True
    # No secret in the loop config: Ray keeps it with the controller's and workers' specs. The
    # workers log in as this driver did, by an object reference to its login.
    clean_uri = split_credentials(uri)[0]
    worker_cfg = cfg.with_overrides({"run.tracking_uri": clean_uri}) if cfg.run.tracking_uri else cfg
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": worker_cfg.to_dict(), "tracking_uri": clean_uri,
                           "mlflow_login": ray.put(runs.login_env(uri)), "run_id": run_id,
                           "export_dir": f"{run_dir}/export", "eval_rows": evaluation,
                           "pass_board": board},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers,
                                     use_gpu=cfg.train.use_gpu,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        # On GPUs, NCCL for the model's collectives and gloo for the loop's small CPU ones
        # (data exhausted on every rank, consumed-example bitmaps): NCCL refuses CPU tensors.
        torch_config=TorchConfig(backend="cpu:gloo,cuda:nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(name=cfg.name, storage_path=storage,
                             failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=2),
                             callbacks=run_config_callbacks),
        datasets={"train": TrainingPasses(cfg, run_dir, board)},
        dataset_config=DataConfig(datasets_to_split=["train"], execution_options=ingest),
    )
    try:
        result = trainer.fit()
    except Exception as e:
        _close_run(uri, run_id, ok=False)
        raise _user_error_in(e) or e
    final = result.return_value or {}
    unlogged = final.get("unlogged", []) + _close_run(uri, run_id, ok=True)
    if unlogged:
        print(f"warning: run {cfg.name} finished, but not all of it reached MLflow: "
              + "; ".join(unlogged), file=sys.stderr, flush=True)
    return TrainResult(
        run_dir=run_dir,
        export_dir=final.get("export_dir"),
        checkpoint_path=result.checkpoint.path if result.checkpoint else None,
        tracking_uri=uri,
        metrics=dict(result.metrics or {}),
        mlflow_run_id=run_id,
        steps_done=int(final.get("steps_done", 0)),
        unlogged=unlogged,
    )


def _close_run(uri: str, run_id: str, ok: bool) -> list[str]:
    """Ends the MLflow run; a server that does not answer leaves it open, said, not raised
    (the run's outcome stands; training/worker.py's logger has retried it already)."""
    try:
        runs.close_run(uri, run_id, ok)
    except (MlflowException, requests.RequestException, OSError) as e:
        return [f"the run's status {'FINISHED' if ok else 'FAILED'} ({type(e).__name__})"]
    return []


def _user_error_in(error: BaseException) -> UserError | None:
    """The first UserError a worker raised, out of Ray Train's wrappers; a bad data record
    (data.on_bad_record: error) becomes one, its message naming the file and line."""
    seen = [error, *getattr(error, "worker_failures", {}).values()]
    for e in seen:
        while e is not None:
            if isinstance(e, UserError):
                return e
            if type(e) is BadRecordError:  # not Ray's RayTaskError(BadRecordError): a traceback
                return DataError(f"training data: {e}")
            e = e.__cause__ or getattr(e, "cause", None)
    return None


def eval_rows(cfg: ExperimentConfig) -> list[dict]:
    """The first `train.eval_examples` rows of `data.eval` (none without eval sources), read on
    the driver: a bad eval source fails before any worker starts, and every rank evaluates
    the same rows however often the workers restart."""
    data = cfg.data
    if not data.eval:
        return []
    rows = iter_records(data.eval, data.tokenizer, max_input_len=data.max_input_len,
                        max_hyper_len=data.max_hyper_len, max_target_len=data.max_target_len,
                        on_bad_record=data.on_bad_record, seed=data.seed, causal=is_decoder_only(cfg))
    keys = ("hyper_input_ids", "input_ids", "labels")
    kept = [{k: row[k] for k in keys} for row in itertools.islice(rows, cfg.train.eval_examples)]
    if not kept:
        raise ConfigError("data.eval: the sources hold no examples")
    return kept


def training_dataset(cfg: ExperimentConfig, epoch, start: dict | None = None, on_block=None):
    """The training rows of one pass as a Ray Dataset (lazy: reading and tokenising run as it
    streams); `epoch` is the pass, or a callable the read task asks for it at each execution;
    `start` and `on_block`: build_dataset's (a position to read the pass from, and where the
    position of each block goes)."""
    data = cfg.data
    return build_dataset(
        [SourceSpec.from_dict(s) for s in data.train], data.tokenizer,
        max_input_len=data.max_input_len, max_hyper_len=data.max_hyper_len,
        max_target_len=data.max_target_len, on_bad_record=data.on_bad_record, seed=data.seed,
        causal=is_decoder_only(cfg), epoch=epoch, start=start, on_block=on_block)


class TrainingPasses:
    """The training dataset, read once per pass: each execution reads the pass on `board`
    (rank 0 sets it first) and records its positions there; the pass of the run's latest
    checkpoint is read from the checkpoint's position, and the rows it consumed are left out.
    Ray Train calls it at every start of the worker group, first or after a failure, so the
    rows left are split equally over the workers."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str, board):
        self.cfg = cfg
        self.run_dir = run_dir
        self.board = board

    def __call__(self):
        state = latest_train_state(self.run_dir)
        dataset = training_dataset(self.cfg, BoardEpoch(self.board), state and state.position,
                                   BoardRecord(self.board))
        if state is None or not state.num_consumed():
            return dataset
        return dataset.map_batches(drop_consumed, batch_format="pyarrow",
                                   fn_kwargs={"consumed": state.consumed.numpy(), "epoch": state.epoch})
