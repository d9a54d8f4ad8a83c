"""Optimizer and gradient handling: Adafactor at a constant learning rate (the paper's HINT and
T5 runs) or AdamW with linear warmup and decay (its decoder-only baselines, Appendix D).

Gradient accumulation is the train loop's job (it sums micro-batch gradients); this module
builds the optimizer and its learning-rate schedule and clips the accumulated gradient.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, distribute_tensor

from hint_platform.config import TrainSection


def build_optimizer(model: nn.Module, train: TrainSection) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters (check model.overrides)")
    if train.optimizer == "adafactor":
        return Adafactor(params, lr=train.lr, weight_decay=train.weight_decay)
    # Multi-tensor on the CPU too (torch's default there is a loop over parameters): with FSDP
    # every per-tensor op is a DTensor dispatch: 35 ms of a ~400 ms demo step as a loop, 11-17 ms
    # as one pass (T5 HINT-tiny, 74 parameters).
    return torch.optim.AdamW(params, lr=train.lr, weight_decay=train.weight_decay, foreach=True)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainSection) -> torch.optim.lr_scheduler.LambdaLR:
    """`train.lr` times `lr_factor` at each step; stepped once per optimizer step. Its state
    (the step it is at) travels in the checkpoints (training/checkpoint.py)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, train.warmup_steps, train.max_steps, train.lr_schedule))


def lr_factor(step: int, warmup_steps: int, max_steps: int, schedule: str) -> float:
    """The learning rate of optimizer step `step` (0-based) as a fraction of `train.lr`: linear
    warmup over the first `warmup_steps` (the first step already moves: 1/warmup), then 1
    (`constant`) or linear decay that reaches 0 at `max_steps` (`linear`, as transformers'
    get_linear_schedule_with_warmup)."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    return max(0.0, (max_steps - step) / max(1, max_steps - warmup_steps))


class Adafactor(torch.optim.Optimizer):
    """Adafactor as `torch.optim.Adafactor` computes it (no momentum, factored second moment,
    update clipping at RMS 1, step size `max(eps2, RMS(param)) * min(lr, 1/sqrt(step))`: at
    lr=1e-3 a constant rate for the first million steps, as in the paper's t5x setup), but
    on FSDP2 shards: torch's implementation fails on DTensors. Each rank updates its own rows
    (FSDP shards dim 0); the statistics that span rows (column means, norms) are summed over
    the ranks, so the update equals the unsharded one.

    Multi-tensor: the norms of all parameters come from one `_foreach_norm`, the statistics
    that need every rank travel in two all-reduces per parameter group (not several per
    parameter), the elementwise update runs as `_foreach` kernels, and nothing waits for the
    device (the step counters are CPU scalars).
    """

    def __init__(self, params, lr: float = 1e-3, beta2_decay: float = -0.8, eps2: float = 1e-3,
                 d: float = 1.0, weight_decay: float = 0.0):
        super().__init__(params, dict(lr=lr, beta2_decay=beta2_decay, eps2=eps2, d=d,
                                      weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if params:
                self._update(params, group)

    def _init_state(self, p: torch.Tensor) -> dict:
        if not self.state[p]:
            self.state[p] = _new_state(p)
        state = self.state[p]
        state["step"] += 1
        return state

    def full_state(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Collective: the state of every parameter of `model` that has one, as whole tensors
        (each rank's rows gathered) on the CPU, keyed `<parameter name>.<step|row_var|...>`."""
        out = {}
        for name, p in model.named_parameters():
            for key, value in self.state.get(p, {}).items():
                whole = value.full_tensor() if isinstance(value, DTensor) else value
                out[f"{name}.{key}"] = whole.detach().cpu().contiguous()
        return out

    def load_full_state(self, model: nn.Module, saved: dict[str, torch.Tensor]) -> list[str]:
        """Sets the state of each trainable parameter of `model` whose state `saved` (from
        `full_state`) holds, every tensor at the shape this parameter's would have; each rank
        keeps its own rows. The others start fresh. Returns the names of those restored."""
        restored = []
        for name, p in model.named_parameters():
            if not p.requires_grad:
                continue
            fresh = _new_state(p)
            found = {key: saved.get(f"{name}.{key}") for key in fresh}
            if all(v is not None and v.shape == fresh[key].shape for key, v in found.items()):
                self.state[p] = {key: _placed(found[key], fresh[key]) for key in fresh}
                restored.append(name)
        return restored

    def _update(self, params: list[torch.Tensor], group: dict) -> None:
        sharded = isinstance(params[0], DTensor)  # FSDP shards every parameter or none
        local = [_local(p) for p in params]
        grads = [_local(p.grad) for p in params]
        states = [self._init_state(p) for p in params]
        steps = [float(s["step"]) for s in states]  # CPU scalars: no device sync
        betas = [step ** group["beta2_decay"] for step in steps]
        device = local[0].device
        numel = _on(device, [float(p.numel()) for p in params])
        rho = _on(device, [min(group["lr"], step ** -0.5) for step in steps])
        eps1 = torch.finfo(local[0].dtype).eps

        param_rms = (_summed(torch.stack(torch._foreach_norm(local)).square(), sharded) / numel).sqrt()
        alpha = param_rms.clamp(min=group["eps2"]) * rho
        if group["weight_decay"]:
            torch._foreach_mul_(local, 1 - group["lr"] * group["weight_decay"])

        factored = [i for i, g in enumerate(grads) if g.dim() > 1]
        # 2-D parameters' columns span the ranks' rows (FSDP shards dim 0); >2-D keep rows whole
        spanning = [i for i in factored if sharded and grads[i].dim() == 2]
        squares = {i: grads[i].square() for i in factored}
        col_sums = {i: squares[i].sum(dim=-2, keepdim=True) for i in factored}
        for i in factored:
            _local(states[i]["row_var"]).lerp_(squares[i].mean(dim=-1, keepdim=True), betas[i])
        row_sums = {i: _local(states[i]["row_var"]).sum(dim=-2, keepdim=True) for i in factored}
        _sum_in_place([col_sums[i] for i in spanning] + [row_sums[i] for i in spanning])
        updates = []
        for i, grad in enumerate(grads):
            if i in squares:
                n_rows = params[i].shape[-2]
                row_var, col_var = _local(states[i]["row_var"]), _local(states[i]["col_var"])
                col_var.lerp_(col_sums[i] / n_rows, betas[i])
                row_mean = row_sums[i] / n_rows
                estimate = row_var @ col_var / row_mean.clamp(min=eps1)
            else:
                variance = _local(states[i]["variance"])
                variance.lerp_(grad.square(), betas[i])
                estimate = variance.clone()
            updates.append(estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad))
        update_rms = (_summed(torch.stack(torch._foreach_norm(updates)).square(), sharded) / numel).sqrt()
        scale = -alpha / (update_rms / group["d"]).clamp(min=1.0)
        torch._foreach_mul_(updates, list(scale.unbind()))
        torch._foreach_add_(local, updates)


def _new_state(p: torch.Tensor) -> dict[str, torch.Tensor]:
    """A parameter's state before its first step: factored second moments (row and column
    means) for a matrix, a full one otherwise; the step counter a CPU scalar."""
    local = _local(p)
    state = {"step": torch.zeros(())}
    if p.dim() > 1:
        state["row_var"] = _like(p, local.new_zeros(local.shape[:-1] + (1,)), p.shape[:-1] + (1,))
        state["col_var"] = _like(p, local.new_zeros(local.shape[:-2] + (1, local.shape[-1])),
                                 p.shape[:-2] + (1, p.shape[-1]), replicated=p.dim() == 2)
    else:
        state["variance"] = _like(p, torch.zeros_like(local), p.shape)
    return state


def _placed(whole: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`whole` where `like` is: on its device, and for a DTensor this rank's part of it (no
    communication: every rank holds `whole`)."""
    if not isinstance(like, DTensor):
        return whole.to(like.device, like.dtype, copy=True)
    return distribute_tensor(whole.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)


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


def _on(device: torch.device, values: list[float]) -> torch.Tensor:
    """`values` on `device` without waiting for it: a plain copy to a GPU from pageable memory
    would wait for every kernel queued before it."""
    t = torch.tensor(values)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


def _summed(t: torch.Tensor, sharded: bool) -> torch.Tensor:
    """`t` summed over the ranks when the parameters are sharded (a new tensor)."""
    if sharded:
        t = t.clone()
        dist.all_reduce(t)
    return t


def _sum_in_place(tensors: list[torch.Tensor]) -> None:
    """Sums every tensor of the list over the ranks, in place, with one all-reduce."""
    if not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors])):
        t.copy_(part.view_as(t))


def clip_gradients(model: nn.Module, max_norm: float) -> torch.Tensor:
    """Clips the global gradient norm (over all ranks for FSDP's DTensor shards) and returns
    the norm before clipping, a device scalar (reading it would wait for the device);
    `max_norm <= 0` only measures it."""
    params = [p for p in model.parameters() if p.grad is not None]
    limit = max_norm if max_norm > 0 else math.inf
    norm = nn.utils.clip_grad_norm_(params, limit)  # multi-tensor where the device has it
    return norm.full_tensor() if isinstance(norm, DTensor) else norm
