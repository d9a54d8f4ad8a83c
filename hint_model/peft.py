"""Per-example parameter-efficient modules: adapters, prefixes, LoRA, as plain functions.

Generated weights arrive as one tensor per kind with a leading *task* dimension (one row per
unique instruction in the batch, or a single row for a cached task / static PEFT) and an
`index` that maps each example of the batch to its task row. Every function here gathers
rows per example and applies them with batched matmuls: no Python loop over examples. A task
dimension of 1 broadcasts instead of copying.

Tensor layout (T tasks, La = layers with an FFN = num_layers + num_decoder_layers,
S = attention slots = num_layers + 2 * num_decoder_layers, in slot order: encoder layers,
then per decoder layer its self- and cross-attention):
  adapter_down [T, La, d, a]   adapter_down_bias [T, La, a]
  adapter_up   [T, La, a, d]   adapter_up_bias   [T, La, d]
  prefix_key / prefix_value    [T, S, P, inner]
  lora_q_a / lora_v_a [T, S, d, r]    lora_q_b / lora_v_b [T, S, r, inner]

A decoder-only model (HintConfig.is_decoder_only) has one attention and one FFN per layer
(La = S = num_layers); its keys / values are kv_inner wide (grouped-query attention), and LoRA
goes on each of cfg.lora_targets (q, k, v, o): lora_<t>_a [T, S, in, r], lora_<t>_b [T, S, r, out].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class AttnPeft:
    """Prefix and / or LoRA weights of one attention, rows per task, picked by `index`."""

    index: Tensor  # [batch] long: task row of each example
    prefix_key: Tensor | None = None  # [T, P, inner]
    prefix_value: Tensor | None = None
    lora_q: tuple[Tensor, Tensor] | None = None  # A [T, d, r], B [T, r, inner]
    lora_v: tuple[Tensor, Tensor] | None = None
    lora_k: tuple[Tensor, Tensor] | None = None  # decoder-only models (cfg.lora_targets)
    lora_o: tuple[Tensor, Tensor] | None = None
    # Instruction fusion (T5: decoder cross-attention): the task's instruction projected to
    # this layer's keys / values once per task, [T, M, inner], and its padding mask [T, M]. A
    # decoder-only model's self-attention takes them as a key/value prefix of the input.
    memory_key: Tensor | None = None
    memory_value: Tensor | None = None
    memory_mask: Tensor | None = None


@dataclass
class AdapterPeft:
    index: Tensor
    down: Tensor  # [T, d, a]
    down_bias: Tensor  # [T, a]
    up: Tensor  # [T, a, d]
    up_bias: Tensor  # [T, d]


@dataclass
class BlockPeft:
    adapter: AdapterPeft | None = None
    self_attn: AttnPeft | None = None
    cross_attn: AttnPeft | None = None  # decoder blocks only


def per_example(t: Tensor, index: Tensor, like: Tensor) -> Tensor:
    """Rows of `t` per example, in the dtype of the activations `like`.

    A single task row is returned as is (it broadcasts in matmul); the cast matters under
    FSDP mixed precision, where generated weights may come out in another dtype.
    """
    t = t if t.shape[0] == 1 else t.index_select(0, index)
    return t.to(like.dtype)


def adapter(h: Tensor, p: AdapterPeft) -> Tensor:
    """Parallel adapter on the normalised FFN input h [B, L, d]: gelu(h Wd + bd) Wu + bu."""
    z = torch.matmul(h, per_example(p.down, p.index, h)) + per_example(p.down_bias, p.index, h)[:, None]
    z = F.gelu(z, approximate="tanh")
    return torch.matmul(z, per_example(p.up, p.index, h)) + per_example(p.up_bias, p.index, h)[:, None]


def lora(x: Tensor, ab: tuple[Tensor, Tensor], index: Tensor) -> Tensor:
    """Low-rank update x A B / r for one projection (scale 1/rank)."""
    a, b = ab
    rank = a.shape[-1]
    return torch.matmul(torch.matmul(x, per_example(a, index, x)), per_example(b, index, x)) / rank


def prepend(k: Tensor, v: Tensor, key: Tensor, value: Tensor, index: Tensor) -> tuple[Tensor, Tensor]:
    """Put per-task keys / values [T, M, inner] (a prefix, or the fused instruction's) in
    front of k, v [B, H, Lk, dk], each example with its task's rows."""
    batch, heads, _, dk = k.shape

    def split_heads(t: Tensor) -> Tensor:
        t = per_example(t, index, k).expand(batch, -1, -1)
        return t.view(batch, t.shape[1], heads, dk).transpose(1, 2)

    return torch.cat([split_heads(key), k], dim=2), torch.cat([split_heads(value), v], dim=2)


def extend_bias(bias: Tensor, p: AttnPeft | None) -> Tensor:
    """The attention bias [B, 1 or H, Lq, Lk] with columns for what `prepend` puts in front of
    the keys: the fused instruction (its padding mask), then the prefix (zeros: always
    visible, no position bias, no padding mask)."""
    if p is None:
        return bias
    if p.memory_key is not None:
        mask = per_example(p.memory_mask, p.index, bias)
        hidden = (1.0 - mask[:, None, None, :]) * torch.finfo(bias.dtype).min
        hidden = hidden.expand(bias.shape[0], *bias.shape[1:-1], -1)
        bias = torch.cat([hidden, bias.expand(hidden.shape[0], *bias.shape[1:])], dim=-1)
    if p.prefix_key is not None:
        bias = F.pad(bias, (p.prefix_key.shape[1], 0))
    return bias


def split_by_block(params: dict[str, Tensor], index: Tensor, num_layers: int,
                   num_decoder_layers: int) -> tuple[list[BlockPeft], list[BlockPeft]]:
    """Cut the per-kind tensors into what each encoder / decoder block uses.

    Encoder layer l: adapter l, attention slot l. Decoder layer i: adapter num_layers + i
    (its self-attention slot's adapter), self slot num_layers + 2i, cross slot + 1.
    """

    def attn(slot: int) -> AttnPeft | None:
        found = AttnPeft(index=index)
        if "prefix_key" in params:
            found.prefix_key = params["prefix_key"][:, slot]
            found.prefix_value = params["prefix_value"][:, slot]
        if "lora_q_a" in params:
            found.lora_q = (params["lora_q_a"][:, slot], params["lora_q_b"][:, slot])
            found.lora_v = (params["lora_v_a"][:, slot], params["lora_v_b"][:, slot])
        return found if found.prefix_key is not None or found.lora_q is not None else None

    encoder = [BlockPeft(_adapter(params, index, l), attn(l)) for l in range(num_layers)]
    decoder = [BlockPeft(_adapter(params, index, num_layers + i), attn(num_layers + 2 * i),
                         attn(num_layers + 2 * i + 1)) for i in range(num_decoder_layers)]
    return encoder, decoder


def _adapter(params: dict[str, Tensor], index: Tensor, layer: int) -> AdapterPeft | None:
    if "adapter_down" not in params:
        return None
    return AdapterPeft(index, params["adapter_down"][:, layer], params["adapter_down_bias"][:, layer],
                       params["adapter_up"][:, layer], params["adapter_up_bias"][:, layer])


def split_by_layer(params: dict[str, Tensor], index: Tensor, num_layers: int) -> list[BlockPeft]:
    """A decoder-only model's share per layer: adapter l and attention slot l (self_attn)."""

    def attn(layer: int) -> AttnPeft | None:
        found = AttnPeft(index=index)
        if "prefix_key" in params:
            found.prefix_key = params["prefix_key"][:, layer]
            found.prefix_value = params["prefix_value"][:, layer]
        for target in "qkvo":
            if f"lora_{target}_a" in params:
                setattr(found, f"lora_{target}", (params[f"lora_{target}_a"][:, layer],
                                                  params[f"lora_{target}_b"][:, layer]))
        loras = (found.lora_q, found.lora_k, found.lora_v, found.lora_o)
        return found if found.prefix_key is not None or any(loras) else None

    return [BlockPeft(_adapter(params, index, layer), attn(layer)) for layer in range(num_layers)]


def attach_prefix(blocks: list[BlockPeft], key: Tensor, value: Tensor, mask: Tensor,
                  index: Tensor) -> None:
    """Give every layer's self-attention of a decoder-only model its layer of the task's
    instruction keys / values ([T, layers, M, kv_inner]) and mask [T, M], in front of the input."""
    for i, block in enumerate(blocks):
        block.self_attn = block.self_attn or AttnPeft(index=index)
        block.self_attn.memory_key, block.self_attn.memory_value = key[:, i], value[:, i]
        block.self_attn.memory_mask = mask


def attach_memory(decoder: list[BlockPeft], key: Tensor, value: Tensor, mask: Tensor,
                  index: Tensor) -> None:
    """Give every decoder block's cross-attention its layer of the fused instruction's
    keys / values ([T, layers, M, inner]) and the mask [T, M]."""
    for i, block in enumerate(decoder):
        block.cross_attn = block.cross_attn or AttnPeft(index=index)
        block.cross_attn.memory_key, block.cross_attn.memory_value = key[:, i], value[:, i]
        block.cross_attn.memory_mask = mask


def lora_dims(cfg, target: str) -> tuple[int, int]:
    """(in, out) widths of the projection that LoRA target q / k / v / o adapts."""
    return {"q": (cfg.d_model, cfg.inner_dim), "k": (cfg.d_model, cfg.kv_inner_dim),
            "v": (cfg.d_model, cfg.kv_inner_dim), "o": (cfg.inner_dim, cfg.d_model)}[target]


def shapes(cfg) -> dict[str, tuple[int, ...]]:
    """The shape of each generated kind for one task (no leading task dimension)."""
    d, inner = cfg.d_model, cfg.kv_inner_dim
    layers, slots = cfg.num_layers + cfg.num_decoder_layers, cfg.num_slots
    out: dict[str, tuple[int, ...]] = {}
    if cfg.adapters:
        a = cfg.adapter_size
        out.update(adapter_down=(layers, d, a), adapter_down_bias=(layers, a),
                   adapter_up=(layers, a, d), adapter_up_bias=(layers, d))
    if cfg.prefixes:
        out.update(prefix_key=(slots, cfg.prefix_length, inner),
                   prefix_value=(slots, cfg.prefix_length, inner))
    if cfg.lora:
        r = cfg.lora_rank
        for target in cfg.lora_targets:
            d_in, d_out = lora_dims(cfg, target)
            out.update({f"lora_{target}_a": (slots, d_in, r), f"lora_{target}_b": (slots, r, d_out)})
    return out
