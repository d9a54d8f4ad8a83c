"""PEFT on decoder-only models: LoRA on every attention projection, adapters and prefixes
through the same peft.py functions as T5, one task's modules per example of a mixed batch."""

import pytest
import torch
from hf_decoders import right_padded

from hint_model import HintConfig, HintModel, TaskModules

ALL = ["q", "k", "v", "o"]


def _random(model):
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)
    return model.eval()


@pytest.mark.parametrize("preset", ["llama-tiny", "gpt2-xl"])
def test_lora_on_every_target_equals_merged_weights(preset):
    small = {} if preset == "llama-tiny" else dict(d_model=32, d_kv=8, num_heads=4, d_ff=64, num_layers=2)
    cfg = HintConfig.preset(preset, variant="static_peft", vocab_size=50, adapters=False,
                            prefixes=False, lora=True, lora_targets=ALL, **small)
    model = _random(HintModel(cfg))
    plain = HintModel(HintConfig.preset(preset, variant="no_instruct", vocab_size=50, **small)).eval()
    plain.base.load_state_dict(model.base.state_dict())
    params, rank = model.static_peft(), cfg.lora_rank
    ids, mask = right_padded([6, 3], vocab=50)
    real = mask.bool()
    with torch.no_grad():
        base = plain(input_ids=ids, attention_mask=mask).logits
        for i, block in enumerate(plain.base.blocks):
            for target in ALL:
                a, b = params[f"lora_{target}_a"][0, i], params[f"lora_{target}_b"][0, i]
                getattr(block.attn, target).weight += (a @ b / rank).T
    with torch.no_grad():
        ours, merged = model(input_ids=ids, attention_mask=mask).logits, plain(input_ids=ids, attention_mask=mask).logits
    assert (ours[real] - merged[real]).abs().max() <= 1e-4
    assert (ours[real] - base[real]).abs().max() > 1e-2  # the LoRA changes something


def test_each_example_gets_its_tasks_modules():
    """Two tasks' modules (LoRA on all targets, adapters, prefixes, instruction prefix) stacked,
    a batch mixing them by task_index: each row as with its own task alone."""
    cfg = HintConfig.preset("llama-tiny", variant="static_peft", vocab_size=50, lora=True, lora_targets=ALL)
    model = _random(HintModel(cfg))
    tasks = []
    for seed, length in ((1, 4), (2, 6)):
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in model.static_peft.parameters():
                p.normal_(0, 0.3)
        instr, _ = right_padded([length], seed=seed, vocab=50)
        tasks.append(model.generate_modules(instr))
    both = TaskModules.stack(tasks)
    ids, mask = right_padded([5, 3, 4], seed=3, vocab=50)
    task_index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        mixed = model(input_ids=ids, attention_mask=mask, modules=both, task_index=task_index).logits
        for row, task in enumerate(task_index.tolist()):
            alone = model(input_ids=ids[row:row + 1], attention_mask=mask[row:row + 1],
                          modules=tasks[task]).logits
            n = int(mask[row].sum())
            assert (mixed[row, :n] - alone[0, :n]).abs().max() <= 1e-4
