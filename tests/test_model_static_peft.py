"""X + PEFT (the reference's use_instructions=False, ni_train_no_hnet.sh): the static modules
come out of the generator's MLPs fed with learned embeddings, and move under Adafactor as the
generated ones do."""

import torch

from hint_model import HintConfig, HintModel
from hint_platform.config import TrainSection
from hint_platform.training.optim import build_optimizer


def modules_before_and_after_a_step(variant: str) -> tuple[dict, dict]:
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("tiny", variant=variant, vocab_size=64)).train()
    optimizer = build_optimizer(model, TrainSection(optimizer="adafactor", lr=1e-3))
    ids = torch.randint(2, 64, (4, 9))
    batch = {"hyper_input_ids": ids, "hyper_attention_mask": torch.ones_like(ids), "input_ids": ids,
             "attention_mask": torch.ones_like(ids), "labels": ids}

    def modules() -> dict:
        with torch.no_grad():
            return {k: v.clone() for k, v in model.generate_modules(ids[:1], torch.ones_like(ids[:1])).peft.items()}

    before = modules()
    model(**batch).loss.backward()
    optimizer.step()
    return before, modules()


def test_static_modules_start_alive_and_move_as_hint_modules_do():
    static_before, static_after = modules_before_and_after_a_step("static_peft")
    hint_before, hint_after = modules_before_and_after_a_step("hint")
    for kind, value in static_before.items():
        assert value.abs().sum() > 0, kind  # no module starts at zero
        moved = (static_after[kind] - value).norm() / value.norm()
        hint_moved = (hint_after[kind] - hint_before[kind]).norm() / hint_before[kind].norm()
        # HINT's also move through the instruction encoder and the attention: about 2-8x more.
        assert moved > hint_moved / 20, (kind, float(moved), float(hint_moved))
