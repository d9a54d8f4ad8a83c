"""Throughput of the train loop between two log points: step time, tokens/s, examples/s, the
fraction of time spent waiting for data, and MFU (model FLOPs / peak FLOPs) on GPUs we know."""

from __future__ import annotations

import math
import time

import torch

# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name().
PEAK_BF16_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12}


def peak_flops(device: torch.device) -> float:
    """Peak FLOP/s of `device`, or nan where unknown (every CPU)."""
    if device.type != "cuda":
        return math.nan
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), math.nan)


class Throughput:
    """Accumulates steps between two log points; `summary()` reports and starts afresh.

    Counts are one worker's; every worker trains the same number of examples per step, so
    rates over the run are `world_size` times the worker's. Tokens are every non-padding token
    the model reads or predicts (instruction, input and target); `flops` is the model FLOPs of
    the worker's examples (forward + backward, padding not counted), for MFU.
    """

    def __init__(self, device: torch.device, world_size: int = 1):
        self.peak = peak_flops(device)
        self.world_size = world_size
        self.restart()

    def restart(self) -> None:
        """Starts a new interval, e.g. after work that is not training (evaluation)."""
        self.steps = 0
        self.examples = 0
        self.tokens = 0
        self.flops = 0.0
        self.wait_s = 0.0
        self.start = time.perf_counter()

    def add(self, examples: int, tokens: int, flops: float, wait_s: float) -> None:
        self.steps += 1
        self.examples += examples
        self.tokens += tokens
        self.flops += flops
        self.wait_s += wait_s

    def summary(self) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        out = {
            "step_time_s": elapsed / max(self.steps, 1),
            "examples_per_s": self.world_size * self.examples / elapsed,
            "tokens_per_s": self.world_size * self.tokens / elapsed,
            "data_wait_fraction": self.wait_s / elapsed,
            "mfu": self.flops / elapsed / self.peak,
        }
        self.restart()
        return out
