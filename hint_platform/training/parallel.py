"""How a model is spread over the workers: FSDP2 sharding, mixed precision, activation
checkpointing, regional compilation. The model knows nothing of sharding, precision or
compilation (torchtitan style): it lists its blocks, and offers per-block activation
checkpointing as a switch that this step turns on (kept in the model because wrapping the
blocks would rename their state-dict keys, which the DCP checkpoints and the Hugging
Face-compatible export share).

One FSDP unit per T5 block, then the root (embeddings, final norms, lm_head, the parameter
generator): each block's parameters are all-gathered as the previous block starts (explicit
forward prefetch) and freed after it runs, so peak memory holds two blocks' full weights plus
the shards.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from hint_model.generator import MLP, CrossAttention
from hint_model.t5 import Block


def parallelize(model: nn.Module, *, device: torch.device, fsdp: bool,
                activation_checkpointing: bool, compile: bool = False,
                reshard_after_forward: bool = True) -> nn.Module:
    """Shards `model` in place over the default process group (when `fsdp` and one exists)
    and returns it. On GPU the compute is bf16 with fp32 master weights and fp32 gradient
    reduction; on CPU (gloo) everything stays fp32. Order as torchtitan's: activation
    checkpointing, then compilation, then sharding. `reshard_after_forward`: FSDP2's (False
    keeps each block's gathered weights from its forward to its backward)."""
    model.set_activation_checkpointing(activation_checkpointing)
    model.to(device)
    if compile:
        compile_blocks(model)
    if not (fsdp and dist.is_initialized()):
        return model
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:
        mp = MixedPrecisionPolicy()
    for block in model.blocks():
        fully_shard(block, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
        if isinstance(block, Block) and hasattr(block, "cross_attn"):  # fusion's per-task pass
            register_fsdp_forward_method(block, "instruction_keys_values")
        if model.config.is_decoder_only:
            block.register_forward_hook(_cached_keys_values_gather_in_backward, with_kwargs=True)
    fully_shard(model, mesh=mesh, mp_policy=mp, reshard_after_forward=reshard_after_forward)
    _prefetch_next_blocks(model)
    return model


def _cached_keys_values_gather_in_backward(block: nn.Module, args: tuple, kwargs: dict, output) -> None:
    """A decoder-only block run over an instruction leaves the instruction's keys / values in
    its `cache` argument, and the input's pass reads them as a prefix: gradients reach the
    block's parameters through them, not through its output, where FSDP2 hooks its
    all-gather for backward (T5's pass returns them: `instruction_keys_values`, registered
    above). So they get FSDP's pre-backward hook as outputs do; their gradients are then
    reduced at the end of backward, as for any unit that runs backward twice."""
    cache = args[4] if len(args) > 4 else kwargs.get("cache")
    if cache and torch.is_grad_enabled():
        block._get_fsdp_state()._register_pre_backward_hook(tuple(cache.values()))


def _prefetch_next_blocks(model: nn.Module) -> None:
    """Each block, as its forward starts, starts gathering the next block of its stack, so the
    all-gather overlaps compute instead of preceding it. (FSDP2 prefetches in backward by
    itself, and skips this during activation checkpointing's recomputation.)"""
    for stack in model.modules():
        blocks = getattr(stack, "blocks", None)
        if isinstance(blocks, nn.ModuleList):
            for block, following in zip(blocks, blocks[1:]):
                block.set_modules_to_forward_prefetch([following])


def compile_blocks(model: nn.Module, backend: str = "inductor") -> None:
    """Regional compilation: every T5 block, and the generator's attention and MLPs, each
    compiled in place. The blocks of a stack share their code, so one compilation serves them
    all: a fraction of the whole model's compile time (132 s for T5-XL whole on an H100), and
    it composes with FSDP's per-block units and activation checkpointing."""
    units = list(model.blocks())
    if getattr(model, "generator", None) is not None:
        units += [m for m in model.generator.modules() if isinstance(m, (MLP, CrossAttention))]
    # Dynamo keeps one graph per variant of a block's code (encoder, decoder, instruction
    # pass, with or without PEFT, static then dynamic lengths): more than its default 8.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    for unit in units:
        unit.compile(backend=backend)
