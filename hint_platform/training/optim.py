"""Optimizer and gradient handling: Adafactor at a constant learning rate (the paper) or AdamW.

Gradient accumulation is the train loop's job (it sums micro-batch gradients); this module
builds the optimizer and clips the accumulated gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from hint_platform.config import TrainSection


def build_optimizer(model: nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (check model.overrides)")
    if train.optimizer == "adafactor":
        return Adafactor(params, lr=train.lr, weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay)


class Adafactor(torch.optim.Optimizer):
    """Adafactor as `torch.optim.Adafactor` computes it (no momentum, factored second moment,
    update clipping at RMS 1, step size `max(eps2, RMS(param)) * min(lr, 1/sqrt(step))`: at
    lr=1e-3 a constant rate for the first million steps, as in the paper's t5x setup), but
    on FSDP2 shards: torch's implementation fails on DTensors. Each rank updates its own rows
    (FSDP shards dim 0); the statistics that span rows (column means, norms) are all-reduced,
    so the update equals the unsharded one.
    """

    def __init__(self, params, lr: float = 1e-3, beta2_decay: float = -0.8, eps2: float = 1e-3,
                 d: float = 1.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps2=eps2, d=d,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    self._update(p, group)

    def _update(self, p: torch.Tensor, group: dict) -> None:
        sharded = isinstance(p, DTensor)
        param = p.to_local() if sharded else p
        grad = p.grad.to_local() if sharded else p.grad
        total = _Sums(sharded)
        state = self.state[p]
        if not state:
            state["step"] = torch.zeros(())
            if grad.dim() > 1:
                state["row_var"] = _like(p, grad.new_zeros(grad.shape[:-1] + (1,)),
                                         p.shape[:-1] + (1,))
                state["col_var"] = _like(p, grad.new_zeros(grad.shape[:-2] + (1, grad.shape[-1])),
                                         p.shape[:-2] + (1, p.shape[-1]), replicated=grad.dim() == 2)
            else:
                state["variance"] = _like(p, torch.zeros_like(grad), p.shape)
        state["step"] += 1
        row_var, col_var, variance = (_local(state.get(k)) for k in ("row_var", "col_var", "variance"))
        step = float(state["step"])
        eps1 = torch.finfo(param.dtype).eps
        beta = step ** group["beta2_decay"]
        rho = min(group["lr"], step ** -0.5)
        alpha = max(group["eps2"], math.sqrt(total(param.square().sum()) / p.numel())) * rho
        if group["weight_decay"]:
            param.mul_(1 - group["lr"] * group["weight_decay"])
        if grad.dim() > 1:
            square = grad.square()
            # rows are whole on this rank; a 2-D parameter's columns span the ranks' rows
            rows_whole = not sharded or grad.dim() > 2
            n_rows = p.shape[-2]
            row_var.lerp_(square.mean(dim=-1, keepdim=True), beta)
            col_sum = square.sum(dim=-2, keepdim=True)
            col_var.lerp_((col_sum if rows_whole else total(col_sum)) / n_rows, beta)
            row_var_sum = row_var.sum(dim=-2, keepdim=True)
            row_mean = (row_var_sum if rows_whole else total(row_var_sum)) / n_rows
            estimate = row_var @ col_var / row_mean.clamp(min=eps1)
        else:
            variance.lerp_(grad.square(), beta)
            estimate = variance.clone()
        update = estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)
        update_rms = math.sqrt(total(update.square().sum()) / p.numel())
        param.add_(update, alpha=-alpha / max(1.0, update_rms / group["d"]))


def _like(p: torch.Tensor, local: torch.Tensor, shape: tuple, replicated: bool = False):
    """Optimizer state for parameter `p`: for a sharded `p`, a DTensor sharded as `p` (or
    replicated) so that checkpoints save every rank's part, not one rank's copy."""
    if not isinstance(p, DTensor):
        return local
    shape = torch.Size(shape)
    placements = [Replicate()] if replicated else p.placements
    return DTensor.from_local(local, p.device_mesh, placements, run_check=False, shape=shape,
                              stride=torch.empty(shape, device="meta").stride())


def _local(t: torch.Tensor | None) -> torch.Tensor | None:
    return t.to_local() if isinstance(t, DTensor) else t


class _Sums:
    """Sums a local tensor over the ranks when the parameter is sharded; returns a float for
    a scalar, a tensor otherwise."""

    def __init__(self, sharded: bool):
        self.sharded = sharded

    def __call__(self, local: torch.Tensor):
        if self.sharded:
            local = local.clone()
            dist.all_reduce(local)
        return float(local) if local.dim() == 0 else local


def clip_gradients(model: nn.Module, max_norm: float) -> float:
    """Clips the global gradient norm (over all ranks for FSDP's DTensor shards) and returns
    the norm before clipping; `max_norm <= 0` only measures it."""
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_norm if max_norm > 0 else math.inf
    norm = nn.utils.clip_grad_norm_(params, limit, foreach=False)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP2
        norm = norm.full_tensor()
    return float(norm)
