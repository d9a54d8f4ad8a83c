"""Checkpoints in one process (no Ray): a round trip restores model, optimizer, learning-rate
schedule and data position; another model's checkpoint and a damaged one are refused with the
directory named."""

from __future__ import annotations

import pytest
import torch

from hint_model import HintConfig, HintModel
from hint_platform.training.checkpoint import ResumeError, load_checkpoint, save_checkpoint
from hint_platform.training.state import TrainState
from hint_platform.config import TrainSection
from hint_platform.training.optim import build_optimizer, build_scheduler, lr_factor

TRAIN = TrainSection(lr=1e-2, optimizer="adamw", lr_schedule="linear", warmup_steps=2, max_steps=10)


def trained(seed: int = 0, steps: int = 1, **overrides):
    torch.manual_seed(seed)
    model = HintModel(HintConfig.preset("tiny", vocab_size=50, **overrides))
    optimizer = build_optimizer(model, TRAIN)
    scheduler = build_scheduler(optimizer, TRAIN)
    for _ in range(steps):
        ids = torch.randint(2, 50, (2, 6))
        model(input_ids=ids, hyper_input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        scheduler.step()
    return model, optimizer, scheduler


def test_round_trip_restores_everything(tmp_path):
    model, optimizer, scheduler = trained(steps=3)
    state = TrainState(step=3, epoch=1)
    state.mark([0, 5, 9])
    save_checkpoint(tmp_path, model, optimizer, scheduler, state, model.config.to_dict())
    fresh, fresh_optimizer, fresh_scheduler = trained(seed=1)
    restored = load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh_scheduler, fresh.config.to_dict())
    # step 3 of warmup 2 + linear decay to 0 at step 10: 7/8 of lr, in the optimizer too
    assert fresh_scheduler.last_epoch == 3 and fresh_optimizer.param_groups[0]["lr"] == pytest.approx(1e-2 * 7 / 8)
    assert (restored.step, restored.epoch, restored.num_consumed()) == (3, 1, 3)
    assert restored.is_consumed(5) and not restored.is_consumed(4)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b)
    saved = optimizer.state_dict()["state"]
    for key, value in fresh_optimizer.state_dict()["state"].items():
        for name in value:
            torch.testing.assert_close(value[name], saved[key][name])


def test_other_shape_and_damaged_checkpoints_are_refused(tmp_path):
    model, optimizer, scheduler = trained()
    save_checkpoint(tmp_path, model, optimizer, scheduler, TrainState(step=1), model.config.to_dict())
    wider, wider_optimizer, wider_scheduler = trained(d_model=96)
    with pytest.raises(ResumeError, match=rf"{tmp_path}.*d_model: checkpoint 64 vs run 96"):
        load_checkpoint(tmp_path, wider, wider_optimizer, wider_scheduler, wider.config.to_dict())
    shard = next(tmp_path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ResumeError, match=f"checkpoint {tmp_path} cannot be loaded"):
        load_checkpoint(tmp_path, model, optimizer, scheduler, model.config.to_dict())
    (tmp_path / ".metadata").unlink()
    with pytest.raises(ResumeError, match=r"\.metadata is missing"):
        load_checkpoint(tmp_path, model, optimizer, scheduler, model.config.to_dict())


def test_linear_schedule_warms_up_then_decays_to_zero_at_max_steps():
    """Appendix D: linear warmup, then linear decay reaching 0 at max_steps; `constant` holds
    the rate after the warmup (the Adafactor runs: no warmup, the rate unchanged)."""
    linear = [lr_factor(step, 4, 12, "linear") for step in range(12)]
    assert linear[:4] == [0.25, 0.5, 0.75, 1.0] and linear[4] == 1.0
    assert linear[-1] == pytest.approx(1 / 8) and lr_factor(12, 4, 12, "linear") == 0.0
    assert all(a > b for a, b in zip(linear[4:], linear[5:]))
    assert [lr_factor(step, 0, 12, "constant") for step in (0, 5, 11)] == [1.0, 1.0, 1.0]
