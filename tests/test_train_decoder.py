"""Training a decoder-only model through the platform's step: the causal batch's loss is
transformers' causal-LM loss over the target (Appendix D), with the instruction read as the
prompt's prefix; FSDP2 per decoder block gives the unsharded model's gradients."""

import pytest
import torch

from hint_model import HintModel
from hint_platform.training.parallel import parallelize
from hint_platform.training.worker import loss_sum
from pipelines.collate import collate
from tests.test_train_performance import one_rank_group  # noqa: F401  (a fixture)
from tests.tiny_decoders import save_tiny_decoder

ROWS = [{"hyper_input_ids": [2, 11, 12, 13, 14], "input_ids": [20, 21, 22], "labels": [30, 31, 2]},
        {"hyper_input_ids": [2, 11, 12, 13, 14], "input_ids": [23], "labels": [32, 2]},
        {"hyper_input_ids": [2, 15, 16], "input_ids": [24, 25, 26, 27], "labels": [33, 34, 35, 2]}]


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_causal_loss_is_transformers_loss_over_the_target(family, tmp_path):
    """Per row, transformers on instruction + input + target with labels only on the target
    (it shifts them itself) gives the summed loss our step computes from the causal batch, in
    which the instruction is the prefix read apart."""
    reference = save_tiny_decoder(family, tmp_path, vocab_size=64, positions=64)
    model = HintModel.from_hf_checkpoint(tmp_path, variant="concat").eval()
    batch = collate(ROWS, pad_id=0, causal=True)
    with torch.no_grad():
        ours = loss_sum(model, batch, causal=True)
        expected = 0.0
        for row in ROWS:
            prompt = row["hyper_input_ids"] + row["input_ids"]
            ids = torch.tensor([prompt + row["labels"]])
            labels = torch.tensor([[-100] * len(prompt) + row["labels"]])
            expected += reference(input_ids=ids, labels=labels).loss * len(row["labels"])
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["gpt2", "opt"])
def test_fsdp_per_decoder_block_gives_the_plain_gradients(family, tmp_path, one_rank_group):  # noqa: F811
    """The instruction's pass leaves its keys / values in each block's cache, read by the
    input's pass: FSDP2 must gather the block's weights for their backward too (without it,
    backward fails on freed storage), and the gradients are the unsharded model's."""
    save_tiny_decoder(family, tmp_path, vocab_size=64, positions=64)
    batch = collate(ROWS, pad_id=0, causal=True)
    grads = []
    for fsdp in (False, True):
        model = parallelize(HintModel.from_hf_checkpoint(tmp_path, variant="concat"),
                            device=torch.device("cpu"), fsdp=fsdp, activation_checkpointing=False)
        loss_sum(model, batch, causal=True).backward()
        grads.append({n: p.grad.full_tensor() if fsdp else p.grad.clone() for n, p in model.named_parameters()})
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-6, msg=name)
