"""Sizes at the paper's scale without a GPU: parameter counts and memory per GPU.

`parameter_counts` builds the model on the meta device (shapes, no storage: seconds even at
xxl). `training_memory` estimates one GPU's share when W workers train with FSDP (hint_platform:
`fully_shard` per block, then the root; fp32 master weights, bf16 compute) and the configured
optimizer (Adafactor for HINT and T5, AdamW for the decoder-only baselines of Appendix D):

  weights    fp32, sharded: 4 N / W
  gradients  fp32, sharded, trainable only: 4 N_train / W
  optimizer  fp32, sharded, trainable only. Adafactor: its factored second moment, a [.., r, c]
             weight keeps r + c values per matrix, a vector its own size (no momentum, as the
             paper's t5x). AdamW: two moments per parameter (exp_avg, exp_avg_sq), 8 N_train / W
  gathered   bf16 weights FSDP unshards while computing: the root's own (embeddings, lm head,
             generator embeddings and MLPs) for the whole step, and two blocks (one prefetched)
  activations  one micro-batch, saved for backward (see `activation_values`)

The activation figure is an estimate (per token: the inputs of every matmul and the FFN's
intermediates; attention weights are not kept, as the fused SDPA kernels do not keep them),
good to the factor that decides whether a micro-batch fits, not to the megabyte.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from hint_model import peft
from hint_model.config import HintConfig
from hint_model.generator import slot_queries
from hint_model.hint import HintModel


@dataclass
class ParameterCounts:
    total: int
    trainable: int
    underlying: int  # the T5 or the decoder-only base
    hyper_encoder: int  # 0 when tied to the underlying model
    generator: int  # the hypernetwork's generator, or the static PEFT modules

    @property
    def t5(self) -> int:
        """The underlying model's parameters (named for the T5 it was first)."""
        return self.underlying


def meta_model(cfg: HintConfig) -> HintModel:
    """The model at its real size on the meta device: shapes only, no memory, no init cost."""
    with torch.device("meta"):
        return HintModel(cfg)


def parameter_counts(cfg: HintConfig, model: nn.Module | None = None) -> ParameterCounts:
    model = model if model is not None else meta_model(cfg)

    def count(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    return ParameterCounts(
        total=count(model), trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        underlying=count(model.t5 if hasattr(model, "t5") else model.base), hyper_encoder=count(model.hyper_encoder),
        generator=count(model.generator) + count(model.static_peft))


@dataclass
class TrainingMemory:
    """Bytes per GPU."""

    weights: float
    gradients: float
    optimizer: float
    gathered: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.gathered + self.activations


def adafactor_state_values(shape: torch.Size) -> int:
    """Values of Adafactor's second-moment statistics for one parameter of this shape."""
    if len(shape) < 2:
        return math.prod(shape)
    return math.prod(shape[:-1]) + math.prod(shape[:-2]) * shape[-1]


def optimizer_state_values(shape: torch.Size, optimizer: str) -> int:
    """Values `optimizer` (hint_platform's `train.optimizer`) keeps for one parameter."""
    if optimizer == "adafactor":
        return adafactor_state_values(shape)
    if optimizer == "adamw":
        return 2 * math.prod(shape)
    raise ValueError(f"unknown optimizer {optimizer!r}: one of adafactor, adamw")


def activation_values(cfg: HintConfig, batch: int, hyper_len: int, input_len: int,
                      target_len: int, checkpointing: bool) -> int:
    """Values one micro-batch keeps for backward, every example its own task (the worst case).

    With checkpointing a block keeps its input (d per token) and one block at a time is
    recomputed in full; without, every block keeps everything (the per-token counts below).
    """
    d, inner, ff = cfg.d_model, cfg.inner_dim, cfg.d_ff * (2 if cfg.is_gated else 1)
    a = cfg.adapter_size if cfg.adapters else 0
    attn = 2 * d + 2 * inner + 2 * cfg.kv_inner_dim  # norm out, q k v, attention out, o out
    ffn = d + 2 * ff + 2 * a  # norm out, FFN intermediates (x2: activation + its input), adapter
    # (tokens, full values per token, layers) of every stack that runs
    if cfg.is_decoder_only:  # one causal pass over prompt + target (and the instruction's)
        stacks = [(batch * (input_len + target_len), attn + ffn, cfg.num_layers)]
        cross_kv, outputs = 0, batch * (input_len + target_len)
        reads_instruction = cfg.hypernetwork or cfg.variant != "no_instruct"
    else:
        memory = input_len + (hyper_len if cfg.fusion else 0)
        stacks = [(batch * input_len, attn + ffn, cfg.num_layers),
                  (batch * target_len, attn + (2 * d + 2 * inner) + ffn, cfg.num_decoder_layers)]
        cross_kv, outputs = batch * memory * 2 * inner, batch * target_len  # the decoder's K/V per layer
        reads_instruction = cfg.hypernetwork
    if reads_instruction:
        stacks.append((batch * hyper_len, attn + ffn - 2 * a, cfg.num_layers))
    generator = 0
    if cfg.hypernetwork and cfg.uses_peft and cfg.generator != "pooled":
        rows = batch * slot_queries(cfg)
        mlp = 3 * cfg.generator_hidden  # hidden, GELU out, dropout out
        if cfg.generator == "decoder":
            stacks.append((rows, 2 * d + 2 * inner + ffn - 2 * a, cfg.generator_depth))
            generator = rows * (d + mlp) + cfg.generator_depth * batch * hyper_len * 2 * inner
        else:  # queries, q, attention out, o out; K/V of the instruction
            generator = rows * (4 * d + mlp) + batch * hyper_len * 2 * inner
    generated = batch * sum(math.prod(s) for s in peft.shapes(cfg).values()) * (
        2 if cfg.hypernetwork else 0)  # the generated modules and the MLP outputs before scaling
    logits = outputs * cfg.vocab_size * 3  # bf16 logits, fp32 copy for the loss
    if checkpointing:
        kept = sum(tokens * d * layers for tokens, _, layers in stacks)
        peak = max(tokens * full for tokens, full, _ in stacks) + cross_kv
    else:
        kept = sum(tokens * full * layers for tokens, full, layers in stacks)
        peak = cross_kv * cfg.num_decoder_layers
    return kept + peak + generator + generated + logits


def training_memory(cfg: HintConfig, workers: int, micro_batch: int, hyper_len: int,
                    input_len: int, target_len: int, checkpointing: bool = True,
                    compute_bytes: int = 2, model: nn.Module | None = None,
                    optimizer: str = "adafactor") -> TrainingMemory:
    """One GPU's memory when `workers` GPUs train `cfg` with FSDP and `optimizer` (adafactor
    or adamw; see the module docstring). `model`: a meta_model(cfg) already built, to save
    building it again."""
    model = model if model is not None else meta_model(cfg)
    params = list(model.parameters())
    total = sum(p.numel() for p in params)
    trainable = [p for p in params if p.requires_grad]
    in_blocks = {id(p) for block in model.blocks() for p in block.parameters()}
    root = sum(p.numel() for p in params if id(p) not in in_blocks)
    biggest_block = max((sum(p.numel() for p in b.parameters()) for b in model.blocks()), default=0)
    return TrainingMemory(
        weights=4 * total / workers,
        gradients=4 * sum(p.numel() for p in trainable) / workers,
        optimizer=4 * sum(optimizer_state_values(p.shape, optimizer) for p in trainable) / workers,
        gathered=compute_bytes * (root + 2 * biggest_block),
        activations=compute_bytes * activation_values(cfg, micro_batch, hyper_len, input_len,
                                                      target_len, checkpointing))
