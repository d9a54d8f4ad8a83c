"""Parameter generators: encoded instruction -> adapter / prefix / LoRA weights.

"component" (the paper's): one learned embedding per (slot, component); one multi-head
cross-attention layer from those embeddings to the encoded instruction (no residual, no norm);
one 2-layer MLP per parameter kind, shared across slots; outputs divided by sqrt(d). The
attention's heads and the MLPs' hidden width are HintConfig.generator_heads / generator_mlp_dim
(the paper's d_model // d_kv and d_model by default).
"decoder" (HyperTune-like): a T5 decoder stack over the same embeddings instead of the single
cross-attention layer. "pooled" (Hypter-like): a mean-pooled instruction through one small MLP
per layer that writes that layer's whole adapter.

Every generator returns the tensors of `peft.shapes(cfg)` with a leading task dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from hint_model import peft
from hint_model.config import HintConfig
from hint_model.t5 import Stack, padding_bias

# Kinds generated one d-wide column per component (a d x r matrix), transposed into place.
_COLUMNS = {"adapter_down", "lora_q_a", "lora_v_a"}


def component_layout(cfg: HintConfig) -> dict[str, tuple[int, int, int]]:
    """kind -> (slots, components per slot, output width of its MLP), from peft.shapes: a
    matrix in _COLUMNS is generated column by column, a bias as one component."""
    out = {}
    for kind, shape in peft.shapes(cfg).items():
        if len(shape) == 2:
            out[kind] = (shape[0], 1, shape[1])
        elif kind in _COLUMNS:
            out[kind] = (shape[0], shape[2], shape[1])
        else:
            out[kind] = shape
    return out


class MLP(nn.Module):
    def __init__(self, d: int, hidden: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out, bias=False)  # the "output layer"

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class CrossAttention(nn.Module):
    """Standard scaled multi-head attention from queries to the instruction states."""

    def __init__(self, d: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))

    def forward(self, queries: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        def heads(t: Tensor) -> Tensor:
            return t.view(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

        out = F.scaled_dot_product_attention(heads(self.q(queries)), heads(self.k(states)),
                                             heads(self.v(states)),
                                             attn_mask=mask[:, None, None, :].bool())
        return self.o(out.transpose(1, 2).flatten(2))


class ComponentGenerator(nn.Module):
    """The "component" generator, or with cfg.generator == "decoder" the HyperTune-like one."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.cfg = cfg
        self.layout = component_layout(cfg)
        d = cfg.d_model
        self.embeddings = nn.ParameterDict({
            kind: nn.Parameter(torch.randn(slots, count, d) / math.sqrt(d))
            for kind, (slots, count, _) in self.layout.items()})
        if cfg.generator == "decoder":
            self.decoder = Stack(cfg, is_decoder=True, num_layers=cfg.generator_layers)
        else:
            self.cross_attn = CrossAttention(d, num_heads=cfg.generator_heads or d // cfg.d_kv)
        self.mlps = nn.ModuleDict({kind: MLP(d, cfg.generator_hidden, width)
                                   for kind, (_, _, width) in self.layout.items()})

    def forward(self, states: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """states [T, L, d] encoded instructions, mask [T, L] -> kind -> [T, *peft.shapes]."""
        tasks, d = states.shape[0], self.cfg.d_model
        kinds = list(self.layout)
        sizes = [self.embeddings[k].shape[0] * self.embeddings[k].shape[1] for k in kinds]
        queries = torch.cat([self.embeddings[k].flatten(0, 1) for k in kinds])
        queries = queries.unsqueeze(0).expand(tasks, -1, -1).to(states.dtype)
        if self.cfg.generator == "decoder":
            mixed = self.decoder(queries, None, memory=states,
                                 memory_bias=padding_bias(mask, states.dtype))
        else:
            mixed = self.cross_attn(queries, states, mask)
        out = {}
        for kind, rows in zip(kinds, mixed.split(sizes, dim=1)):
            slots, count, width = self.layout[kind]
            value = self.mlps[kind](rows).view(tasks, slots, count, width) / math.sqrt(d)
            if kind in _COLUMNS:
                value = value.transpose(2, 3)
            out[kind] = value.reshape(tasks, *peft.shapes(self.cfg)[kind])
        return out


class PooledGenerator(nn.Module):
    """Hypter-like: masked mean of the instruction, then per layer Linear-GELU-Linear that
    writes the flattened adapter (down, down bias, up, up bias) of that layer."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.cfg = cfg
        d, a, h = cfg.d_model, cfg.adapter_size, cfg.generator_hidden
        layers = cfg.num_layers + cfg.num_decoder_layers
        self.sizes = [d * a, a, a * d, d]
        self.w1 = nn.Parameter(torch.randn(layers, d, h) / math.sqrt(d))
        self.w2 = nn.Parameter(torch.randn(layers, h, sum(self.sizes)) / math.sqrt(h))

    def forward(self, states: Tensor, mask: Tensor) -> dict[str, Tensor]:
        m = mask.to(states.dtype).unsqueeze(-1)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)  # [T, d]
        hidden = F.gelu(torch.einsum("td,ldh->tlh", pooled, self.w1.to(states.dtype)))
        flat = torch.einsum("tlh,lho->tlo", hidden, self.w2.to(states.dtype)) / math.sqrt(self.cfg.d_model)
        shapes = peft.shapes(self.cfg)
        names = ("adapter_down", "adapter_down_bias", "adapter_up", "adapter_up_bias")
        tasks = states.shape[0]
        return {name: part.reshape(tasks, *shapes[name])
                for name, part in zip(names, flat.split(self.sizes, dim=-1))}


def build_generator(cfg: HintConfig) -> nn.Module:
    return PooledGenerator(cfg) if cfg.generator == "pooled" else ComponentGenerator(cfg)


class StaticPeft(nn.Module):
    """X + PEFT baseline: one learned set of modules shared by every task (task dimension 1).
    Adapters start as the identity (up projection zero)."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.params = nn.ParameterDict()
        for kind, shape in peft.shapes(cfg).items():
            zero = kind in ("adapter_up", "adapter_up_bias", "adapter_down_bias", "lora_q_b", "lora_v_b")
            init = torch.zeros(1, *shape) if zero else torch.randn(1, *shape) * cfg.d_model ** -0.5
            self.params[kind] = nn.Parameter(init)

    def forward(self) -> dict[str, Tensor]:
        return dict(self.params.items())
