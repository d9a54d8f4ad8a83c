"""The training dataset of a resumed run starts at the position its checkpoint saved (training/
driver.py, 'Data position and resume'): real Ray Data and a real PassBoard actor, a checkpoint
written by save_checkpoint. The rows are those of the pass without the consumed ones, as an
uninterrupted run reads them, and the read task starts at the checkpoint's position; the
dataset loads without torch."""

from __future__ import annotations

import functools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import ray

from hint_model import HintConfig, HintModel
from hint_platform.config import TrainSection, from_dict
from hint_platform.training.board import PassBoard
from hint_platform.training.checkpoint import latest_train_state, save_checkpoint
from hint_platform.training.driver import TrainingPasses
from hint_platform.training.optim import build_optimizer, build_scheduler
from hint_platform.training.state import TrainState, checkpoint_position
from pipelines.dataset import BLOCK_ROWS


def write_checkpoint(run_dir: Path, state: TrainState, board) -> None:
    """A checkpoint as a worker writes it, registered as Ray Train's checkpoint manager does."""
    model = HintModel(HintConfig.preset("tiny", vocab_size=50))
    optimizer = build_optimizer(model, TrainSection())
    save_checkpoint(run_dir / "checkpoint_1", model, optimizer, build_scheduler(optimizer, TrainSection()),
                    state, model.config.to_dict(), data_position=functools.partial(checkpoint_position, board))
    (run_dir / "checkpoint_manager_snapshot.json").write_text(
        json.dumps({"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_1"}}))


def plain(rows: list[dict]) -> list[dict]:
    return [{k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in r.items()} for r in rows]


def test_a_resumed_training_dataset_starts_at_the_checkpoint_position(shared_data, ray_local, tmp_path):
    cfg = from_dict({
        "name": "position", "model": {"preset": "tiny", "variant": "hint"},
        "data": {"tokenizer": str(shared_data / "tokenizer" / "t5"), "max_input_len": 128,
                 "max_hyper_len": 128, "max_target_len": 32,
                 "train": [{"kind": "sni", "path": str(shared_data / "sni"), "split": "mini",
                            "max_per_task": 8}]},
        "run": {"storage_path": str(tmp_path)}})
    run_dir = tmp_path / "position"
    board = PassBoard.remote()
    full = plain(TrainingPasses(cfg, str(run_dir), board)().take_all())  # no checkpoint yet: the whole pass
    assert [r["example_index"] for r in full] == list(range(len(full))) and len(full) > 2 * BLOCK_ROWS

    # Ranks consumed the pass up to 290 but for a hole at 280, and a few rows further on.
    state = TrainState(step=5, epoch=0)
    state.mark([i for i in range(290) if i != 280] + [300, 301, BLOCK_ROWS * 2 + 5])
    state.gather()
    write_checkpoint(run_dir, state, board)
    saved = latest_train_state(str(run_dir))
    assert saved.position["index"] == BLOCK_ROWS and saved.position["epoch"] == 0

    again = PassBoard.remote()  # a restarted driver's
    resumed = plain(TrainingPasses(cfg, str(run_dir), again)().take_all())
    assert resumed == [r for r in full if not state.is_consumed(r["example_index"])]
    # The read task started at the saved position: the first block it recorded is that one.
    assert ray.get(again.position_at.remote(0, 0)) is None
    assert ray.get(again.position_at.remote(0, BLOCK_ROWS))["index"] == BLOCK_ROWS

    # What Ray Data's processes of the stream load to run it (the DatasetManager and
    # SplitCoordinator actors, the read task: new processes each stage) imports no torch: it
    # would cost them seconds before the first step has its data.
    dataset = TrainingPasses(cfg, str(run_dir), PassBoard.remote())()
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False); "
         "ray.cloudpickle.loads(sys.stdin.buffer.read()); print(sorted(m for m in sys.modules if m == 'torch'))",
         ray.get_runtime_context().gcs_address],
        input=ray.cloudpickle.dumps(dataset), capture_output=True, timeout=120)
    assert loaded.returncode == 0, loaded.stderr.decode()[-2000:]
    assert loaded.stdout.decode().strip().splitlines()[-1] == "[]"
