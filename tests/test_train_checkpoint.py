"""Checkpoints in one process (no Ray): a round trip restores model, optimizer, learning-rate
schedule and data position; another model's checkpoint and a damaged one are refused with the
directory named."""

from __future__ import annotations

import pytest
import torch

from hint_model import HintConfig, HintModel
from hint_platform.training.checkpoint import (
    ResumeError,
    export_model,
    load_checkpoint,
    restore_optimizer,
    save_checkpoint,
)
from hint_platform.training.state import TrainState
from hint_platform.config import TrainSection
from hint_platform.training.optim import build_optimizer, build_scheduler, lr_factor
from pipelines import train_tokenizer

TRAIN = TrainSection(lr=1e-2, optimizer="adamw", lr_schedule="linear", warmup_steps=2, max_steps=10)
ADAFACTOR = TrainSection(lr=1e-2)  # the optimizer whose state an export carries


def trained(seed: int = 0, steps: int = 1, train: TrainSection = TRAIN, **overrides):
    torch.manual_seed(seed)
    model = HintModel(HintConfig.preset("tiny", vocab_size=50, **overrides))
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train)
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


def one_step(model, optimizer, ids):
    model(input_ids=ids, hyper_input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_adamw_is_multi_tensor_and_steps_as_torchs_per_tensor_loop():
    """build_optimizer's AdamW runs its update as one multi-tensor pass (foreach) on the CPU
    too, and moves the weights exactly as torch's per-tensor AdamW does."""
    model, optimizer, _ = trained(steps=3)
    torch.manual_seed(0)
    reference = HintModel(HintConfig.preset("tiny", vocab_size=50))
    per_tensor = torch.optim.AdamW(reference.parameters(), lr=TRAIN.lr, weight_decay=TRAIN.weight_decay,
                                   foreach=False)
    scheduler = build_scheduler(per_tensor, TRAIN)
    for _ in range(3):
        ids = torch.randint(2, 50, (2, 6))
        reference(input_ids=ids, hyper_input_ids=ids, labels=ids).loss.backward()
        per_tensor.step()
        scheduler.step()
    assert optimizer.param_groups[0]["foreach"] is True
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_fine_tuning_from_an_export_starts_with_its_optimizer_state(tmp_path):
    """The first step from an export takes the step the first stage would have taken next: its
    second moments and step counters carried in the export; a fresh optimizer's differs."""
    train_tokenizer(["a small corpus for the export's tokenizer"] * 4, tmp_path / "tok", vocab_size=40)
    model, optimizer, _ = trained(train=ADAFACTOR)
    for _ in range(3):
        one_step(model, optimizer, torch.randint(2, 50, (2, 6)))
    export_model(model, tmp_path / "export", tmp_path / "tok", optimizer, step=4)
    ids = torch.randint(2, 50, (2, 6))
    carried = {}
    for restore in (True, False):
        tuned = HintModel.from_pretrained(tmp_path / "export", variant="hint")
        tuned_optimizer = build_optimizer(tuned, TrainSection(lr=1e-2))
        if restore:
            said = restore_optimizer(tmp_path / "export", tuned, tuned_optimizer)
            n = sum(p.requires_grad for p in tuned.parameters())
            assert f"(step 4) restored for {n} of {n} trainable tensors" in said
        carried[restore] = one_step(tuned, tuned_optimizer, ids)
    continued = one_step(model, optimizer, ids)
    for name, value in continued.items():
        torch.testing.assert_close(carried[True][name], value, rtol=0, atol=1e-7)
    moved = [(carried[False][k] - v).abs().max() for k, v in continued.items() if v.dim() > 1]
    assert max(moved) > 1e-4  # a fresh Adafactor's first step is another step


def test_an_export_of_another_variant_restores_the_state_that_matches(tmp_path):
    train_tokenizer(["a small corpus for the export's tokenizer"] * 4, tmp_path / "tok", vocab_size=40)
    model, optimizer, _ = trained(train=ADAFACTOR, variant="adapters_only")
    export_model(model, tmp_path / "export", tmp_path / "tok", optimizer, step=1)
    tuned = HintModel.from_pretrained(tmp_path / "export", variant="hint")
    tuned_optimizer = build_optimizer(tuned, TrainSection(lr=1e-2))
    said = restore_optimizer(tmp_path / "export", tuned, tuned_optimizer)
    fresh = sorted(tuned.load_report.initialised)
    n = sum(p.requires_grad for p in tuned.parameters())
    assert f"restored for {n - len(fresh)} of {n} trainable tensors; fresh: {fresh[0]}" in said
    before = dict(model.named_parameters())
    for name, p in tuned.named_parameters():
        if name in fresh:
            assert not tuned_optimizer.state.get(p)
        else:
            torch.testing.assert_close(tuned_optimizer.state[p], optimizer.state[before[name]])
