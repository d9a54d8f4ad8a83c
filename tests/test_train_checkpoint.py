"""Checkpoints in one process (no Ray): a round trip restores model, optimizer and data
position; another model's checkpoint and a damaged one are refused with the directory named."""

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
from hint_platform.training.optim import build_optimizer


def trained(seed: int = 0, **overrides):
    torch.manual_seed(seed)
    model = HintModel(HintConfig.preset("tiny", vocab_size=50, **overrides))
    optimizer = build_optimizer(model, TrainSection(lr=1e-2))
    ids = torch.randint(2, 50, (2, 6))
    model(input_ids=ids, hyper_input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    return model, optimizer


def test_round_trip_restores_everything(tmp_path):
    model, optimizer = trained()
    state = TrainState(step=3, epoch=1)
    state.mark([0, 5, 9])
    save_checkpoint(tmp_path, model, optimizer, state, model.config.to_dict())
    fresh, fresh_optimizer = trained(seed=1)
    restored = load_checkpoint(tmp_path, fresh, fresh_optimizer, fresh.config.to_dict())
    assert (restored.step, restored.epoch, restored.num_consumed()) == (3, 1, 3)
    assert restored.is_consumed(5) and not restored.is_consumed(4)
    for a, b in zip(model.state_dict().values(), fresh.state_dict().values()):
        torch.testing.assert_close(a, b)
    saved = optimizer.state_dict()["state"]
    for key, value in fresh_optimizer.state_dict()["state"].items():
        for name in value:
            torch.testing.assert_close(value[name], saved[key][name])


def test_other_shape_and_damaged_checkpoints_are_refused(tmp_path):
    model, optimizer = trained()
    save_checkpoint(tmp_path, model, optimizer, TrainState(step=1), model.config.to_dict())
    wider, wider_optimizer = trained(d_model=96)
    with pytest.raises(ResumeError, match=rf"{tmp_path}.*d_model: checkpoint 64 vs run 96"):
        load_checkpoint(tmp_path, wider, wider_optimizer, wider.config.to_dict())
    shard = next(tmp_path.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(ResumeError, match=f"checkpoint {tmp_path} cannot be loaded"):
        load_checkpoint(tmp_path, model, optimizer, model.config.to_dict())
    (tmp_path / ".metadata").unlink()
    with pytest.raises(ResumeError, match=r"\.metadata is missing"):
        load_checkpoint(tmp_path, model, optimizer, model.config.to_dict())


def one_step(model, optimizer, ids):
    model(input_ids=ids, hyper_input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_fine_tuning_from_an_export_starts_with_its_optimizer_state(tmp_path):
    """The first step from an export takes the step the first stage would have taken next: its
    second moments and step counters carried in the export; a fresh optimizer's differs."""
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spiece.model").write_bytes(b"not read here")
    model, optimizer = trained()
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
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "spiece.model").write_bytes(b"not read here")
    model, optimizer = trained(variant="adapters_only")
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
