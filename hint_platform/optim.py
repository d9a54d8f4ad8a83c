"""Optimizer and gradient handling: Adafactor at a constant learning rate (the paper) or AdamW.

Gradient accumulation is the train loop's job (it sums micro-batch gradients); this module
builds the optimizer and clips the accumulated gradient.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from hint_platform.config import TrainSection


def build_optimizer(model: nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (check model.overrides)")
    if train.optimizer == "adafactor":
        # torch's Adafactor has no momentum and factors the second moment of matrices, as the
        # paper's t5x setup; `lr` is used as a constant (no relative step, no warmup).
        # foreach=False: the foreach path does not take FSDP2's DTensor shards of mixed shapes.
        return torch.optim.Adafactor(params, lr=train.lr, weight_decay=train.weight_decay,
                                     foreach=False)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clips the global gradient norm (over all ranks for FSDP's DTensor shards) and returns
    the norm before clipping; `max_norm <= 0` only measures it."""
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_norm if max_norm > 0 else math.inf
    norm = nn.utils.clip_grad_norm_(params, limit, foreach=False)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
