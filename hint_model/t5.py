"""T5 v1.1 (and v1.0) encoder-decoder, written for what HINT needs.

Same maths as Hugging Face's T5ForConditionalGeneration (checked to 1e-4 in fp32), plus three
hooks: prefix keys/values in every attention, adapters parallel to every FFN, and an arbitrary
cross-attention memory for the decoder (instruction fusion). All HINT weights come in through
`BlockPeft` arguments; this file knows nothing of where they come from, nor of parallelism.

Attention is one `scaled_dot_product_attention` call with the relative position bias plus the
padding / causal mask as an additive float mask, and scale 1 (T5 folds 1/sqrt(d) into init).
Each stack builds that mask once for all its layers, in the form the fused kernels take
(`kernel_mask`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from hint_model import peft
from hint_model.config import HintConfig
from hint_model.peft import AttnPeft, BlockPeft


class RMSNorm(nn.Module):
    """T5's layer norm: scale only, no mean, no bias; variance in fp32."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)
        return self.weight * x.to(self.weight.dtype)


class LengthSharedDropout(nn.Dropout):
    """Dropout with one mask per example and feature, shared over the length: t5x's
    `nn.Dropout(broadcast_dims=(-2,))`, used for every dropout of its T5 but the encoder's last."""

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0:
            return x
        keep = torch.empty(x.shape[0], 1, x.shape[-1], device=x.device, dtype=x.dtype).bernoulli_(1 - self.p)
        return x * keep / (1 - self.p)


class FeedForward(nn.Module):
    """Gated-GELU (v1.1: wi_0, wi_1, wo) or ReLU (v1.0: wi, wo)."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.gated = cfg.is_gated
        if self.gated:
            self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
            self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        else:
            self.wi = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.dropout = LengthSharedDropout(cfg.dropout_rate)

    def forward(self, x: Tensor) -> Tensor:
        if self.gated:
            h = F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x)
        else:
            h = F.relu(self.wi(x))
        return self.wo(self.dropout(h))


class Attention(nn.Module):
    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.num_heads, self.d_kv = cfg.num_heads, cfg.d_kv
        self.q = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.k = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.v = nn.Linear(cfg.d_model, cfg.inner_dim, bias=False)
        self.o = nn.Linear(cfg.inner_dim, cfg.d_model, bias=False)
        self.dropout = cfg.dropout_rate

    def forward(self, x: Tensor, bias: Tensor, memory: Tensor | None = None,
                p: AttnPeft | None = None, cache: dict | None = None) -> Tensor:
        """x [B, Lq, d]; memory [B, Lk, d] for cross-attention (None: self-attention);
        bias: a kernel_mask broadcastable to [B, H, Lq, keys], with columns for what `p` puts
        in front of the keys (peft.extend_bias); cache: this attention's decoding state (self:
        keys/values of the tokens so far; cross: the projected memory behind the task's fused
        instruction and prefix keys/values, made once)."""
        batch, q_len, _ = x.shape
        q = peft.project(self.q, x, p, "q")
        cross = memory is not None
        if cross and cache is not None and "k" in cache:
            k, v = cache["k"], cache["v"]
        else:
            source = memory if cross else x
            k = self._split(peft.project(self.k, source, p, "k"))
            v = self._split(peft.project(self.v, source, p, "v"))
            if p is not None and p.memory_key is not None:  # the task's fused instruction
                k, v = peft.prepend(k, v, p.memory_key, p.memory_value, p.index)
            if cross and p is not None and p.prefix_key is not None:  # constant: cached with the memory
                k, v = peft.prepend(k, v, p.prefix_key, p.prefix_value, p.index)
            if cache is not None:
                if not cross and "k" in cache:  # self-attention: append the new tokens
                    k, v = torch.cat([cache["k"], k], dim=2), torch.cat([cache["v"], v], dim=2)
                cache["k"], cache["v"] = k, v
        if not cross and p is not None and p.prefix_key is not None:  # the cache holds real tokens only
            k, v = peft.prepend(k, v, p.prefix_key, p.prefix_value, p.index)
        # Kept: the attention weights' dropout is element-wise, the fused kernel's; t5x shares its
        # mask over the queries, which no SDPA kernel offers (it would cost the math kernel).
        out = F.scaled_dot_product_attention(
            self._split(q), k, v, attn_mask=bias,
            dropout_p=self.dropout if self.training else 0.0, scale=1.0)
        return peft.project(self.o, out.transpose(1, 2).reshape(batch, q_len, -1), p, "o")

    def _split(self, t: Tensor) -> Tensor:
        return t.view(t.shape[0], t.shape[1], self.num_heads, self.d_kv).transpose(1, 2)


class Block(nn.Module):
    """Pre-norm residual block: self-attention, [cross-attention,] FFN (+ parallel adapter)."""

    def __init__(self, cfg: HintConfig, is_decoder: bool):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.attn = Attention(cfg)
        if is_decoder:
            self.cross_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
            self.cross_attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.ffn = FeedForward(cfg)
        self.dropout = LengthSharedDropout(cfg.dropout_rate)

    def forward(self, x: Tensor, bias: Tensor, memory: Tensor | None = None,
                memory_bias: Tensor | None = None, p: BlockPeft | None = None,
                cache: dict | None = None) -> Tensor:
        p = p or BlockPeft()
        x = x + self.dropout(self.attn(self.attn_norm(x), bias, p=p.self_attn,
                                       cache=None if cache is None else cache["self"]))
        if memory is not None:
            x = x + self.dropout(self.cross_attn(self.cross_norm(x), memory_bias, memory=memory,
                                                 p=p.cross_attn,
                                                 cache=None if cache is None else cache["cross"]))
        h = self.ffn_norm(x)
        y = self.dropout(self.ffn(h))
        if p.adapter is not None:  # not dropped (the reference's HyperEncoderLayer adds it after)
            y = y + peft.adapter(h, p.adapter)
        return x + y

    def instruction_keys_values(self, states: Tensor, p: AttnPeft | None = None
                                ) -> tuple[Tensor, Tensor]:
        """This decoder block's cross-attention keys and values of encoded instructions [T, M, d]
        (with the task's LoRA on k / v in `p`, one task row per instruction): the part of the
        fused memory that depends on the task alone (hint.py computes it once per task). A
        method of the block, so that a sharding wrapper can gather the block's weights for it
        as it does for `forward`."""
        return (peft.project(self.cross_attn.k, states, p, "k"),
                peft.project(self.cross_attn.v, states, p, "v"))


class Stack(nn.Module):
    """A T5 encoder or decoder stack. The first layer's relative position bias is shared by
    all layers, so it lives here (`relative_bias`), not in a block."""

    def __init__(self, cfg: HintConfig, is_decoder: bool, num_layers: int):
        super().__init__()
        self.cfg, self.is_decoder = cfg, is_decoder
        self.relative_bias = nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads)
        self.blocks = nn.ModuleList(Block(cfg, is_decoder) for _ in range(num_layers))
        self.final_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.dropout = LengthSharedDropout(cfg.dropout_rate)
        # The encoder's output dropout is the one t5x does not share over the length.
        self.final_dropout = self.dropout if is_decoder else nn.Dropout(cfg.dropout_rate)
        self.checkpointing = False

    def forward(self, x: Tensor, mask_bias: Tensor, memory: Tensor | None = None,
                memory_bias: Tensor | None = None, peft_blocks: list[BlockPeft] | None = None,
                cache: list[dict] | None = None) -> Tensor:
        """x: embedded tokens [B, L, d]. mask_bias: additive padding mask over the keys
        (encoder), or None for a decoder (causal). cache: one dict per block while decoding."""
        offset = 0 if cache is None or "k" not in cache[0]["self"] else cache[0]["self"]["k"].shape[2]
        bias = self.position_bias(x.shape[1], offset, x.device)
        bias = bias + mask_bias if mask_bias is not None else bias
        # Every layer's modules have the same prefix length and fused instruction
        # (peft.split_by_block, peft.attach_memory): the masks are extended once per stack.
        first = peft_blocks[0] if peft_blocks else BlockPeft()
        bias = kernel_mask(peft.extend_bias(bias, first.self_attn), x.dtype)
        if memory is not None:
            memory_bias = kernel_mask(peft.extend_bias(memory_bias, first.cross_attn), x.dtype)
        x = self.dropout(x)
        for i, block in enumerate(self.blocks):
            args = (x, bias, memory, memory_bias, peft_blocks[i] if peft_blocks else None,
                    None if cache is None else cache[i])
            if self.checkpointing and self.training:
                x = checkpoint(block, *args, use_reentrant=False)
            else:
                x = block(*args)
        return self.final_dropout(self.final_norm(x))

    def position_bias(self, q_len: int, offset: int, device) -> Tensor:
        """[1, H, q_len, offset + q_len]: bucketed relative position bias, plus the causal
        mask for a decoder (queries sit at positions offset .. offset + q_len - 1)."""
        k_len = offset + q_len
        query = torch.arange(offset, k_len, device=device)[:, None]
        key = torch.arange(k_len, device=device)[None, :]
        buckets = relative_position_bucket(
            key - query, bidirectional=not self.is_decoder,
            num_buckets=self.cfg.relative_attention_num_buckets,
            max_distance=self.cfg.relative_attention_max_distance)
        bias = self.relative_bias(buckets).permute(2, 0, 1).unsqueeze(0)
        if self.is_decoder:
            bias = bias.masked_fill(key > query, torch.finfo(bias.dtype).min)
        return bias


def relative_position_bucket(relative_position: Tensor, bidirectional: bool, num_buckets: int,
                             max_distance: int) -> Tensor:
    """Mesh TensorFlow's bucketing: exact buckets for small distances, log-spaced up to
    max_distance; a decoder only sees the past, so it spends all buckets on one side."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = -torch.clamp(relative_position, max=0)
    max_exact = num_buckets // 2
    log_bucket = max_exact + (
        torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
        * (num_buckets - max_exact)).long()
    log_bucket = torch.clamp(log_bucket, max=num_buckets - 1)
    return buckets + torch.where(distance < max_exact, distance, log_bucket)


def padding_bias(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """[B, L] 1/0 mask -> [B, 1, 1, L] additive bias (0 visible, most negative hidden)."""
    return kernel_mask((1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min, dtype)


# Row alignment (elements) of an attention mask that the memory-efficient SDPA kernel takes
# as it is; it pads a copy of any other at every call (8 in recent torch, 16 before).
MASK_ALIGNMENT = 16


def kernel_mask(bias: Tensor, dtype: torch.dtype) -> Tensor:
    """`bias` as the fused SDPA kernels take an additive mask: in the activations' dtype, its
    last dimension contiguous (a strided one, like the position bias' permuted embedding
    rows, sends SDPA to the math kernel on a GPU) and its rows MASK_ALIGNMENT-aligned.
    A mask already in that form is returned as it is."""
    ready = bias.dtype == dtype and bias.stride(-1) == 1 and all(
        stride % MASK_ALIGNMENT == 0 for stride in bias.stride()[:-1])
    if ready:
        return bias
    width = bias.shape[-1]
    return F.pad(bias.to(dtype).contiguous(), (0, -width % MASK_ALIGNMENT))[..., :width]


class T5(nn.Module):
    """Shared embedding, encoder, decoder, lm head."""

    def __init__(self, cfg: HintConfig):
        super().__init__()
        self.cfg = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Stack(cfg, is_decoder=False, num_layers=cfg.num_layers)
        self.decoder = Stack(cfg, is_decoder=True, num_layers=cfg.num_decoder_layers)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)

    def encode(self, input_ids: Tensor, attention_mask: Tensor,
               peft_blocks: list[BlockPeft] | None = None) -> Tensor:
        x = self.shared(input_ids)
        return self.encoder(x, padding_bias(attention_mask, x.dtype), peft_blocks=peft_blocks)

    def decode(self, decoder_input_ids: Tensor, memory: Tensor, memory_mask: Tensor,
               peft_blocks: list[BlockPeft] | None = None, cache: list[dict] | None = None) -> Tensor:
        """Logits [B, L, vocab] for the decoder inputs, attending to memory [B, M, d]."""
        x = self.shared(decoder_input_ids)
        h = self.decoder(x, None, memory=memory, memory_bias=padding_bias(memory_mask, x.dtype),
                         peft_blocks=peft_blocks, cache=cache)
        if self.cfg.scale_decoder_outputs:
            h = h * self.cfg.d_model ** -0.5
        head = self.shared.weight if self.cfg.tie_word_embeddings else self.lm_head.weight
        return F.linear(h, head)

    def new_cache(self) -> list[dict]:
        return [{"self": {}, "cross": {}} for _ in self.decoder.blocks]

    @torch.no_grad()
    def init_weights(self) -> None:
        """T5's initialisation (the scale T5 folds out of attention lives here).

        As Hugging Face's, except the untied lm_head: fan-in scaling (std d**-0.5) as in T5X's
        reference, not Hugging Face's std 1.0, whose initial logits are ~sqrt(d) times too large
        (initial loss ~30 instead of ~ln(vocab)) and slow a model trained from scratch.
        """
        d, inner, d_ff = self.cfg.d_model, self.cfg.inner_dim, self.cfg.d_ff
        nn.init.normal_(self.shared.weight, std=1.0)
        if not self.cfg.tie_word_embeddings:
            nn.init.normal_(self.lm_head.weight, std=d ** -0.5)
        for module in self.modules():
            if isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Stack):
                nn.init.normal_(module.relative_bias.weight, std=d ** -0.5)
            elif isinstance(module, Attention):
                nn.init.normal_(module.q.weight, std=(d * self.cfg.d_kv) ** -0.5)
                nn.init.normal_(module.k.weight, std=d ** -0.5)
                nn.init.normal_(module.v.weight, std=d ** -0.5)
                nn.init.normal_(module.o.weight, std=inner ** -0.5)
            elif isinstance(module, FeedForward):
                for name in ("wi_0", "wi_1", "wi"):
                    if hasattr(module, name):
                        nn.init.normal_(getattr(module, name).weight, std=d ** -0.5)
                nn.init.normal_(module.wo.weight, std=d_ff ** -0.5)
