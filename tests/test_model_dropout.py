"""Dropout as the reference places it (hyper_network.py HyperEncoderLayer, t5x's T5): the FFN's
output is dropped and the parallel adapter's is not, and masks are shared over the length."""

import torch

from hint_model import HintConfig, peft
from hint_model.peft import AdapterPeft, BlockPeft
from hint_model.t5 import Block


def block(dropout: float) -> tuple[Block, HintConfig]:
    torch.manual_seed(0)
    cfg = HintConfig.preset("tiny", variant="hint", dropout_rate=dropout)
    b = Block(cfg, is_decoder=False).train()
    torch.nn.init.zeros_(b.attn.o.weight)  # the block's change is then the FFN branch alone
    return b, cfg


def run(b: Block, cfg: HintConfig, p: BlockPeft | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(3, 7, cfg.d_model)
    bias = torch.zeros(1, 1, 7, 7)
    return x, b(x, bias, p=p) - x


def test_the_adapter_output_is_not_dropped():
    b, cfg = block(dropout=0.5)
    torch.nn.init.zeros_(b.ffn.wo.weight)
    a, d = 4, cfg.d_model
    p = BlockPeft(adapter=AdapterPeft(index=torch.zeros(3, dtype=torch.long), down=torch.randn(1, d, a),
                                      down_bias=torch.randn(1, a), up=torch.randn(1, a, d), up_bias=torch.randn(1, d)))
    x, change = run(b, cfg, p)
    torch.testing.assert_close(change, peft.adapter(b.ffn_norm(x), p.adapter))


def test_dropout_masks_are_shared_over_the_length():
    b, cfg = block(dropout=0.5)
    _, change = run(b, cfg)
    dropped = change == 0
    assert dropped.any() and not dropped.all()
    assert (dropped == dropped[:, :1]).all()  # the same features dropped at every position
