"""How a model is spread over the workers: FSDP2 sharding, mixed precision, activation
checkpointing. The model knows nothing of sharding or precision (torchtitan style): it lists its
blocks, and offers per-block activation checkpointing as a switch that this step turns on (kept
in the model because wrapping the blocks would rename their state-dict keys, which the DCP
checkpoints and the Hugging Face-compatible export share).

One FSDP unit per T5 block, then the root (embeddings, final norms, lm_head, the parameter
generator): each block's parameters are all-gathered just before it runs and freed after, so
peak memory holds one block's full weights plus the shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


def parallelize(model: nn.Module, *, device: torch.device, fsdp: bool,
                activation_checkpointing: bool) -> nn.Module:
    """Shards `model` in place over the default process group (when `fsdp` and one exists)
    and returns it. On GPU the compute is bf16 with fp32 master weights and fp32 gradient
    reduction; on CPU (gloo) everything stays fp32."""
    model.set_activation_checkpointing(activation_checkpointing)
    model.to(device)
    if not (fsdp and dist.is_initialized()):
        return model
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
