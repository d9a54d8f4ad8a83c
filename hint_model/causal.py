"""What every decoder-only family (gpt2.py, opt.py, llama.py) shares: the attention (RoPE,
grouped-query heads, LoRA, prefixes, the instruction's key/value prefix, the cache), the FFN
with its parallel adapter, the pre- or post-norm block, and the model skeleton.

One forward serves training, the instruction pass and each decoding step: tokens [B, L] at
absolute positions [B, L] (an input after a cached instruction starts at that instruction's
length; a right-padded prompt continues from its own length while decoding). Each query attends
to [prefix, instruction, cached tokens, new tokens]: `key_mask` [B, cached + L] says which
cached and new tokens are real (right padding is masked, never moved), and causality goes by
the index in the cache. Keys are stored after RoPE, so the cache and an instruction's keys are
used as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hint_model import peft
from hint_model.config import HintConfig
from hint_model.peft import AttnPeft, BlockPeft
from hint_model.t5 import kernel_mask

ACTIVATION = {"gelu_new": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu,
              "relu": F.relu, "silu": F.silu}


def project(linear: nn.Linear, x: Tensor, p: AttnPeft | None, target: str) -> Tensor:
    """linear(x), plus the task's LoRA on this target where `p` has one."""
    y = linear(x)
    ab = None if p is None else getattr(p, f"lora_{target}")
    return y if ab is None else y + peft.lora(x, ab, p.index)


def rotary(positions: Tensor, dim: int, theta: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """cos, sin [B, 1, L, dim] of RoPE at these positions (Hugging Face's half-split layout)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, device=positions.device).float() / dim))
    angles = positions[..., None].float() * inv_freq
    angles = torch.cat([angles, angles], dim=-1)[:, None]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], dim=-1) * sin


def causal_bias(key_mask: Tensor, q_len: int, dtype: torch.dtype) -> Tensor:
    """[B, 1, q_len, K] additive mask: the queries are the last q_len of the K cached + new
    tokens; each sees the real ones (key_mask [B, K]) up to itself."""
    k_len = key_mask.shape[1]
    query = torch.arange(k_len - q_len, k_len, device=key_mask.device)[:, None]
    key = torch.arange(k_len, device=key_mask.device)[None, :]
    visible = key_mask[:, None, None, :].bool() & (key <= query)
    return torch.zeros(visible.shape, dtype=dtype, device=key_mask.device).masked_fill(
        ~visible, torch.finfo(dtype).min)


class Attention(nn.Module):
    def __init__(self, cfg: HintConfig, qkv_bias: bool, out_bias: bool):
        super().__init__()
        self.num_heads, self.kv_heads, self.d_kv = cfg.num_heads, cfg.kv_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=qkv_bias)
        self.k = nn.Linear(cfg.d_model, cfg.kv_inner_dim, bias=qkv_bias)
        self.v = nn.Linear(cfg.d_model, cfg.kv_inner_dim, bias=qkv_bias)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=out_bias)
        self.dropout = cfg.dropout_rate

    def forward(self, x: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor] | None,
                p: AttnPeft | None = None, cache: dict | None = None, past: int = 0) -> Tensor:
        """x [B, L, d]; mask: [B, 1, L, keys] with columns for p's prefix and instruction
        (peft.extend_bias); cache: this layer's keys / values, of which the first `past` are
        the tokens before x, extended in place (a call run again, as activation checkpointing
        does, writes the same); prefix and instruction are put in front, never cached."""
        batch, length, _ = x.shape
        q = self._split(project(self.q, x, p, "q"), self.num_heads)
        k = self._split(project(self.k, x, p, "k"), self.kv_heads)
        v = self._split(project(self.v, x, p, "v"), self.kv_heads)
        if rope is not None:
            q, k = rotate(q, *rope), rotate(k, *rope)
        if cache is not None:
            if past:
                k = torch.cat([cache["k"][:, :, :past], k], dim=2)
                v = torch.cat([cache["v"][:, :, :past], v], dim=2)
            cache["k"], cache["v"] = k, v
        if p is not None and p.memory_key is not None:  # the task's instruction
            k, v = peft.prepend(k, v, p.memory_key, p.memory_value, p.index)
        if p is not None and p.prefix_key is not None:
            k, v = peft.prepend(k, v, p.prefix_key, p.prefix_value, p.index)
        if self.kv_heads != self.num_heads:  # grouped-query: each kv head serves a group of q heads
            groups = self.num_heads // self.kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            scale=self.d_kv ** -0.5)
        return project(self.o, out.transpose(1, 2).reshape(batch, length, -1), p, "o")

    def _split(self, t: Tensor, heads: int) -> Tensor:
        return t.view(t.shape[0], t.shape[1], heads, self.d_kv).transpose(1, 2)


class FeedForward(nn.Module):
    """down(act(up x)), or down(act(gate x) * up x) when gated (SwiGLU)."""

    def __init__(self, cfg: HintConfig, bias: bool):
        super().__init__()
        self.up = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias)
        self.gate = nn.Linear(cfg.d_model, cfg.d_ff, bias=bias) if cfg.is_gated else None
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=bias)
        self.act = ACTIVATION[cfg.feed_forward_proj]
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        h = self.act(self.gate(x)) * self.up(x) if self.gate is not None else self.act(self.up(x))
        return self.down(self.dropout(h))


class Block(nn.Module):
    """Residual attention + FFN (+ the parallel adapter on the FFN's input); pre-norm, or
    post-norm (each sum normalised: OPT's do_layer_norm_before=False)."""

    def __init__(self, cfg: HintConfig, norm: type[nn.Module], qkv_bias: bool, bias: bool,
                 post_norm: bool = False):
        super().__init__()
        self.attn_norm = norm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.attn = Attention(cfg, qkv_bias, out_bias=bias)
        self.ffn_norm = norm(cfg.d_model, eps=cfg.layer_norm_epsilon)
        self.ffn = FeedForward(cfg, bias)
        self.post_norm = post_norm
        self.dropout = nn.Dropout(cfg.dropout_rate)

    def forward(self, x: Tensor, mask: Tensor, rope: tuple[Tensor, Tensor] | None,
                p: BlockPeft | None = None, cache: dict | None = None, past: int = 0) -> Tensor:
        p = p or BlockPeft()
        h = x if self.post_norm else self.attn_norm(x)
        x = x + self.dropout(self.attn(h, mask, rope, p.self_attn, cache, past))
        h = self.attn_norm(x) if self.post_norm else self.ffn_norm(x)
        y = self.ffn(h)
        if p.adapter is not None:
            y = y + peft.adapter(h, p.adapter)
        x = (h if self.post_norm else x) + self.dropout(y)
        return self.ffn_norm(x) if self.post_norm else x


class CausalLM(nn.Module):
    """Token (and position) embeddings -> blocks -> final norm -> lm head. A family builds
    `tokens`, `blocks`, `lm_head` (None when tied to `tokens`) and defines `embed` and
    `finish`; `rotary` says whether its attention takes RoPE."""

    rotary = False

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.cfg = cfg
        self.dropout = nn.Dropout(cfg.dropout_rate)
        self.checkpointing = False

    def embed(self, input_ids: Tensor, positions: Tensor) -> Tensor:
        raise NotImplementedError

    def finish(self, x: Tensor) -> Tensor:
        """The last block's output -> the states the lm head reads (final norm, projection)."""
        raise NotImplementedError

    def forward(self, input_ids: Tensor, positions: Tensor, key_mask: Tensor,
                peft_blocks: list[BlockPeft] | None = None, cache: list[dict] | None = None) -> Tensor:
        """Final states [B, L, d'] of tokens [B, L] at positions [B, L]; key_mask [B, K] marks
        the real tokens among the K = cached + L (see the module docstring)."""
        x = self.dropout(self.embed(input_ids, positions))
        rope = rotary(positions, self.cfg.d_kv, self.cfg.rope_theta, x.dtype) if self.rotary else None
        # Every layer's modules have the same prefix length and instruction: one mask for all.
        first = peft_blocks[0].self_attn if peft_blocks else None
        mask = kernel_mask(peft.extend_bias(causal_bias(key_mask, x.shape[1], x.dtype), first), x.dtype)
        past = key_mask.shape[1] - x.shape[1]  # tokens already in the cache
        for i, block in enumerate(self.blocks):
            args = (x, mask, rope, peft_blocks[i] if peft_blocks else None,
                    None if cache is None else cache[i], past)
            if self.checkpointing and self.training:
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return self.finish(x)

    def logits(self, states: Tensor) -> Tensor:
        head = self.tokens.weight if self.lm_head is None else self.lm_head.weight
        return F.linear(states, head)

    def new_cache(self) -> list[dict]:
        return [{} for _ in self.blocks]

    @torch.no_grad()
    def init_weights(self) -> None:
        """Hugging Face's (GPT-2 / OPT / Llama: normal 0.02, zero biases, unit norms), with
        GPT-2's 1/sqrt(2 layers) on the projections that write into the residual stream."""
        residual = 0.02 / (2 * self.cfg.num_layers) ** 0.5
        for name, module in self.named_modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                out = name.endswith((".attn.o", ".ffn.down"))
                nn.init.normal_(module.weight, std=residual if out else 0.02)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
            elif hasattr(module, "weight") and not list(module.children()):  # a norm
                nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
