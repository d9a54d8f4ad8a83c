"""Where a model runs for inference, in what precision, and how much memory its task-state cache
may take: one decision for every inference path (`hint eval`, `hint predict`, `hint serve`, the
registered pyfunc, `hint paper run`).

Inside a Ray task or actor the device is the GPU Ray assigned to the process (Ray sets
CUDA_VISIBLE_DEVICES to the assigned ids, so the first one is `cuda:0` there), else the CPU:
never "cuda" guessed in a process that got no GPU. In a plain process: CUDA when there is one.
"""

from __future__ import annotations

import logging

import psutil
import ray
import torch

from hint_model.flops import task_state_values
from hint_platform.errors import UserError

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
GPU_CACHE_FRACTION = 0.5  # of the device memory free after the model: the rest is for activations
CPU_CACHE_FRACTION = 0.2  # of the RAM available: several actors may share a node


def choose_device(assigned_gpu_ids: list[str] | None, cuda_available: bool) -> torch.device:
    """The pure decision. `assigned_gpu_ids`: the GPU ids Ray assigned to this worker, None
    outside a Ray worker (a driver or a plain process)."""
    if assigned_gpu_ids is None:
        return torch.device("cuda" if cuda_available else "cpu")
    if not assigned_gpu_ids:
        return torch.device("cpu")
    if not cuda_available:  # running on the CPU here would be silently slow by 100x
        raise RuntimeError(f"Ray assigned GPU(s) {', '.join(assigned_gpu_ids)} to this process, "
                           "but torch sees no CUDA device (a CPU-only torch build or a driver problem?)")
    return torch.device("cuda:0")


def assigned_gpu_ids() -> list[str] | None:
    """The GPU ids Ray assigned to this process if it is a Ray task or actor, else None."""
    if not ray.is_initialized():
        return None
    context = ray.get_runtime_context()
    if context.worker.mode != ray.WORKER_MODE:  # the driver: it was assigned nothing
        return None
    return [str(i) for i in context.get_accelerator_ids().get("GPU", [])]


def inference_device() -> torch.device:
    return choose_device(assigned_gpu_ids(), torch.cuda.is_available())


def inference_dtype(device: torch.device | str, requested: str | torch.dtype | None = None) -> torch.dtype:
    """bf16 on CUDA, fp32 on the CPU, unless `requested` (a name of DTYPES, or a torch dtype) says otherwise."""
    if isinstance(requested, torch.dtype):
        return requested
    if requested is not None:
        if requested not in DTYPES:
            raise UserError(f"dtype {requested!r}: valid are {', '.join(DTYPES)}")
        return DTYPES[requested]
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def task_state_bytes(model) -> int:
    """Bytes of one task state at the model's longest instruction: its values in the model's
    dtype, plus with fusion the instruction's padding mask (int64 per token)."""
    cfg = model.config
    element = next(model.parameters()).element_size()
    mask = 8 * cfg.max_hyper_len if cfg.fusion else 0
    return task_state_values(cfg, cfg.max_hyper_len) * element + mask


def cache_bound(free_bytes: int, state_bytes: int, fraction: float) -> int:
    """`fraction` of the free memory, raised to one longest task state where that fits in what is
    free (so long instructions are cached too), never more than is free."""
    bound = int(free_bytes * fraction)
    if bound < state_bytes <= free_bytes:
        bound = state_bytes
    return min(bound, max(free_bytes, 0))


def free_bytes(device: torch.device | str) -> int:
    """Memory free for the cache: on CUDA the device's (after the model, already loaded), on the
    CPU the RAM available."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def default_cache_bytes(model, device: torch.device | str | None = None) -> int:
    """The task-state cache bound of a model already on `device` (default: the model's)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    fraction = GPU_CACHE_FRACTION if device.type == "cuda" else CPU_CACHE_FRACTION
    state = task_state_bytes(model)
    bound = cache_bound(free_bytes(device), state, fraction)
    if bound < state:
        log.warning("task-state cache of %.0f MiB on %s is smaller than one state at the longest "
                    "instruction (%d tokens, %.0f MiB): long instructions will not be cached",
                    bound / 2**20, device, model.config.max_hyper_len, state / 2**20)
    return bound


def model_process_resources(cluster: dict[str, float], gpus: float | None = None,
                            cpus: float = 1.0) -> dict[str, float]:
    """The Ray options of a task or actor that will run a model, on a cluster with these
    resources (`ray.cluster_resources()`): `gpus` GPUs (default one) and one CPU when the
    cluster has GPUs, else `cpus` CPUs."""
    if cluster.get("GPU", 0) > 0:
        return {"num_gpus": 1.0 if gpus is None else gpus, "num_cpus": 1.0}
    return {"num_cpus": cpus}


def model_process_count(cluster: dict[str, float], resources: dict[str, float],
                        requested: int | None, work_units: int) -> int:
    """How many model processes to start: `requested` (default: one per GPU share on a GPU
    cluster, one on a CPU cluster), at most as many as the cluster's GPUs hold, at most one per
    unit of work (a task), at least one."""
    gpus = resources.get("num_gpus", 0)
    fits = int(cluster.get("GPU", 0) // gpus) if gpus else None
    count = requested or fits or 1
    if fits is not None:
        count = min(count, fits)
    return max(1, min(count, work_units))
