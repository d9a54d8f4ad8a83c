"""Parameter generators: encoded instruction -> adapter / prefix / LoRA weights.

Reference: allenai/hyper-task-descriptions, modeling/hyper_network.py (`Hypernet`) and
modeling/layers.py (`MlpBlock`); the paths in comments below are in it.

"component" (the paper's): one learned embedding per (slot, component); one multi-head
cross-attention layer from those embeddings to the encoded instruction (no residual, no norm);
one 2-layer MLP per parameter kind, shared across slots; outputs divided by sqrt(d). The
attention's heads and the MLPs' hidden width are HintConfig.generator_heads / generator_mlp_dim
(the paper's d_model // d_kv and d_model by default).
"decoder" (HyperTune-like, layer_embedding_method="decoder"): the same embeddings through a
separate T5 decoder run with hyper=True: every layer is cross-attention to the instruction +
FFN, with NO self-attention and no position bias (the slot queries never see each other, so
nothing is quadratic in the ~53.6k queries at xl), then the decoder's final norm and one
RMSNorm per parameter kind before its MLP. Its layers start as the T5 decoder's
(`SlotDecoder.copy_from`; HintModel does it at construction and in from_t5_checkpoint).
"pooled" (Hypter, layer_embedding_method="none" + per_layer_hnet): the masked mean of the
instruction through one MLP per parameter kind whose output spans every layer.

Init as t5x: MLPs truncated normal with std 1/sqrt(fan_in) (MlpBlock's variance_scaling(1.0,
"fan_in", "truncated_normal")); attention normal 1/sqrt(fan_in), queries further divided by
sqrt(head dim) and no scaling in the dot product (t5x MultiHeadDotProductAttention); slot
embeddings normal 1/sqrt(d).

Every generator returns the tensors of `peft.shapes(cfg)` with a leading task dimension.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hint_model import peft
from hint_model.config import HintConfig
from hint_model.t5 import Attention, FeedForward, RMSNorm, Stack, padding_bias

# Kinds generated one column per component (an input-width x r matrix), transposed into place.
_COLUMNS = {"adapter_down", *(f"lora_{target}_a" for target in peft.LORA_TARGETS)}

# jax.nn.initializers.truncated_normal draws from N(0, 1) cut at +-2, whose std is this; t5x
# divides by it so that the kept draws have the std asked for.
_TRUNCATED_STD = 0.87962566103423978


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


def slot_queries(cfg: HintConfig) -> int:
    """Rows the component / decoder generator runs: one per (slot, component)."""
    return sum(slots * count for slots, count, _ in component_layout(cfg).values())


def fan_in_truncated_normal_(weight: Tensor) -> None:
    """t5x's variance_scaling(1.0, "fan_in", "truncated_normal") on an nn.Linear weight."""
    std = weight.shape[1] ** -0.5 / _TRUNCATED_STD
    nn.init.trunc_normal_(weight, std=std, a=-2 * std, b=2 * std)


class MLP(nn.Module):
    """modeling/layers.py MlpBlock as the generator uses it: Dense -> GELU (tanh) -> dropout ->
    Dense, no biases."""

    def __init__(self, d: int, hidden: int, out: int, dropout: float):
        super().__init__()
        self.fc1 = nn.Linear(d, hidden, bias=False)
        self.fc2 = nn.Linear(hidden, out, bias=False)  # the "output layer"
        self.dropout = nn.Dropout(dropout)
        fan_in_truncated_normal_(self.fc1.weight)
        fan_in_truncated_normal_(self.fc2.weight)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.dropout(F.gelu(self.fc1(x), approximate="tanh")))


class CrossAttention(nn.Module):
    """t5x MultiHeadDotProductAttention from queries to the instruction states: the 1/sqrt(head
    dim) lives in the query init, not in the dot product; dropout on the attention weights."""

    def __init__(self, d: int, num_heads: int, dropout: float):
        super().__init__()
        self.num_heads, self.dropout = num_heads, dropout
        self.q, self.k, self.v, self.o = (nn.Linear(d, d, bias=False) for _ in range(4))
        with torch.no_grad():
            nn.init.normal_(self.q.weight, std=(d * (d // num_heads)) ** -0.5)
            for proj in (self.k, self.v, self.o):
                nn.init.normal_(proj.weight, std=d ** -0.5)

    def forward(self, queries: Tensor, states: Tensor, mask: Tensor) -> Tensor:
        """queries [1, Q, d] (the same for every task: projected once, then one copy per task),
        states [T, L, d], mask [T, L] -> [T, Q, d]."""
        def heads(t: Tensor) -> Tensor:
            return t.view(t.shape[0], t.shape[1], self.num_heads, -1).transpose(1, 2)

        query = heads(self.q(queries)).expand(states.shape[0], -1, -1, -1).contiguous()
        out = F.scaled_dot_product_attention(query, heads(self.k(states)),
                                             heads(self.v(states)),
                                             attn_mask=padding_bias(mask, states.dtype),
                                             dropout_p=self.dropout if self.training else 0.0,
                                             scale=1.0)
        return self.o(out.transpose(1, 2).flatten(2))


class SlotDecoderLayer(nn.Module):
    """A T5 decoder layer called with hyper=True (hyper_network.py HyperDecoderLayer): pre-norm
    cross-attention to the instruction and pre-norm FFN, each residual; no self-attention. The
    parameter names are the T5 decoder Block's, so its weights copy over by name."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.cross_attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ffn = FeedForward(cfg)
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, memory: Tensor, memory_bias: Tensor) -> Tensor:
        x = x + self.dropout(self.cross_attn(self.cross_norm(x), memory_bias, memory=memory))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SlotDecoder(nn.Module):
    """The decoder generator's stack: generator_depth SlotDecoderLayers, the final norm, dropout.
    Its `blocks` are FSDP / activation-checkpointing units like a Stack's."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.blocks = nn.ModuleList(SlotDecoderLayer(cfg) for _ in range(cfg.generator_depth))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.checkpointing = False

    def forward(self, queries: Tensor, memory: Tensor, memory_bias: Tensor) -> Tensor:
        x = queries
        for block in self.blocks:
            if self.checkpointing and self.training:
                x = checkpoint(block, x, memory, memory_bias, use_reentrant=False)
            else:
                x = block(x, memory, memory_bias)
        return self.dropout(self.final_norm(x))

    @torch.no_grad()
    def copy_from(self, decoder: Stack) -> None:
        """Layer i <- the T5 decoder's layer i without its self-attention; the final norm too
        (gins/hypertune.gin restores hyper/hyper_decoder from the checkpoint's decoder)."""
        for mine, theirs in zip(self.blocks, decoder.blocks):
            mine.load_state_dict({k: v for k, v in theirs.state_dict().items()
                                  if not k.startswith(("attn.", "attn_norm."))})
        self.final_norm.load_state_dict(decoder.final_norm.state_dict())


def slot_embeddings(cfg: HintConfig, layout: dict) -> nn.ParameterDict:
    """One learned embedding per (slot, component) of each kind."""
    d = cfg.d_model
    return nn.ParameterDict({kind: nn.Parameter(torch.randn(slots, count, d) / math.sqrt(d))
                             for kind, (slots, count, _) in layout.items()})


def kind_mlps(cfg: HintConfig, layout: dict) -> nn.ModuleDict:
    """Each kind's MLP, from d to the width of one component."""
    return nn.ModuleDict({kind: MLP(cfg.d_model, cfg.generator_hidden, width, cfg.generator_dropout_rate)
                          for kind, (_, _, width) in layout.items()})


class ComponentGenerator(nn.Module):
    """The "component" generator, or with cfg.generator == "decoder" the HyperTune-like one."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.cfg = cfg
        self.layout = component_layout(cfg)
        d = cfg.d_model
        self.embeddings = slot_embeddings(cfg, self.layout)
        if cfg.generator == "decoder":
            self.decoder = SlotDecoder(cfg)
            # hyper_network.py generate_parameter: layer_norm(inputs) when the method is "decoder"
            self.norms = nn.ModuleDict({kind: RMSNorm(d, cfg.layer_norm_epsilon) for kind in self.layout})
        else:
            self.cross_attn = CrossAttention(d, cfg.generator_heads or d // cfg.d_kv, cfg.dropout_rate)
        self.mlps = kind_mlps(cfg, self.layout)

    def forward(self, states: Tensor, mask: Tensor) -> dict[str, Tensor]:
        """states [T, L, d] encoded instructions, mask [T, L] -> kind -> [T, *peft.shapes]."""
        tasks = states.shape[0]
        kinds = list(self.layout)
        sizes = [self.embeddings[k].shape[0] * self.embeddings[k].shape[1] for k in kinds]
        queries = torch.cat([self.embeddings[k].flatten(0, 1) for k in kinds]).unsqueeze(0).to(states.dtype)
        if self.cfg.generator == "decoder":
            mixed = self.decoder(queries.expand(tasks, -1, -1), states, padding_bias(mask, states.dtype))
        else:
            mixed = self.cross_attn(queries, states, mask)
        norms = self.norms if self.cfg.generator == "decoder" else None
        return generated(self.cfg, self.layout, self.mlps, dict(zip(kinds, mixed.split(sizes, dim=1))), norms)


def generated(cfg: HintConfig, layout: dict, mlps: nn.ModuleDict, rows: dict[str, Tensor],
              norms: nn.ModuleDict | None = None) -> dict[str, Tensor]:
    """Each kind's rows [T, slots * components, d] through [its norm and] its MLP, divided by
    sqrt(d) (hyper_network.py generate_parameter), shaped as peft.shapes with T in front."""
    out = {}
    for kind, x in rows.items():
        slots, count, width = layout[kind]
        if norms is not None:
            x = norms[kind](x)
        value = mlps[kind](x).view(x.shape[0], slots, count, width) / math.sqrt(cfg.d_model)
        if kind in _COLUMNS:
            # Kept on purpose: transposed, so embedding j becomes column j. The reference
            # reshapes [a, d] rows into [d, a] (hyper_network.py generate_parameter), which
            # scatters one embedding's output over several columns.
            value = value.transpose(2, 3)
        out[kind] = value.reshape(x.shape[0], *peft.shapes(cfg)[kind])
    return out


class PooledGenerator(nn.Module):
    """Hypter (gins/hypter.gin): the masked mean of the instruction through one MLP per adapter
    kind (hidden width d), each writing that kind for every layer at once (per_layer_hnet).
    The reference also writes adapters for the decoder's cross-attention slots, which no layer
    reads; this writes the num_layers + num_decoder_layers adapters that are used."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.cfg = cfg
        self.shapes = peft.shapes(cfg)
        self.mlps = nn.ModuleDict({kind: MLP(cfg.d_model, cfg.generator_hidden, math.prod(shape),
                                             cfg.generator_dropout_rate)
                                   for kind, shape in self.shapes.items()})

    def forward(self, states: Tensor, mask: Tensor) -> dict[str, Tensor]:
        m = mask.to(states.dtype).unsqueeze(-1)
        pooled = (states * m).sum(1) / m.sum(1).clamp(min=1)  # [T, d]
        scale = math.sqrt(self.cfg.d_model)
        return {kind: self.mlps[kind](pooled).view(-1, *shape) / scale
                for kind, shape in self.shapes.items()}


def build_generator(cfg: HintConfig) -> nn.Module:
    return PooledGenerator(cfg) if cfg.generator == "pooled" else ComponentGenerator(cfg)


class StaticPeft(nn.Module):
    """X + PEFT baseline: one learned set of modules shared by every task (task dimension 1), as
    the reference makes it (use_instructions=False, scripts/nat_int/ni_train_no_hnet.sh): the
    component generator's learned slot embeddings go straight into its per-kind MLPs, outputs
    divided by sqrt(d), with no instruction to attend to. Direct parameters with a zero adapter
    up-projection would barely move under Adafactor's relative step size."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.cfg = cfg
        self.layout = component_layout(cfg)
        self.embeddings = slot_embeddings(cfg, self.layout)
        self.mlps = kind_mlps(cfg, self.layout)

    def forward(self) -> dict[str, Tensor]:
        return generated(self.cfg, self.layout, self.mlps,
                         {kind: e.flatten(0, 1).unsqueeze(0) for kind, e in self.embeddings.items()})
