"""Peak memory of per-example LoRA in a mixed-task batch: hint_model.peft.lora (each example's
A and B gathered per example, batched matmuls) against a copy of A and B per token (what a
per-token hook does, e.g. Text-to-LoRA's training forward), forward + backward on the same batch.

Each method runs in a fresh process: its peak is the process's peak resident memory (VmHWM,
reset before the step; on a GPU the CUDA allocator's peak) minus what it held before the step,
so that neither run sees the other's freed memory. (Not ru_maxrss: a child inherits its
parent's across fork and exec, so a large parent's resident memory would hide the step's.) Llama-3-8B's q projection widths by default.

    .venv/bin/python bench/peft_memory.py [--batch 8 --length 512 --tasks 4 --d 4096 --rank 8]
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import psutil
import torch

from hint_model.peft import lora, per_example


def per_token_copy(x, ab, index):
    """The same update with A and B copied for every token: [B, L, in, r] and [B, L, r, out]."""
    a, b = ab
    batch, length, _ = x.shape
    a_tok = per_example(a, index, x)[:, None].expand(batch, length, -1, -1).contiguous()
    b_tok = per_example(b, index, x)[:, None].expand(batch, length, -1, -1).contiguous()
    xa = torch.einsum("bli,blir->blr", x, a_tok)
    return torch.einsum("blr,blro->blo", xa, b_tok) / a.shape[-1]


def run_one(method: str, args) -> float:
    """Peak MiB of one forward + backward of `method` above what the process held before."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    x = torch.randn(args.batch, args.length, args.d, device=device, requires_grad=True)
    a = torch.randn(args.tasks, args.d, args.rank, device=device, requires_grad=True)
    b = torch.randn(args.tasks, args.rank, args.d, device=device, requires_grad=True)
    index = torch.arange(args.batch, device=device) % args.tasks
    fn = lora if method == "batched" else per_token_copy
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        before = psutil.Process().memory_info().rss
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) back to the current RSS
    fn(x, (a, b), index).square().sum().backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
    else:
        status = Path("/proc/self/status").read_text()
        peak = int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024
    return (peak - before) / 2**20


def measure(batch: int, length: int, tasks: int, d: int, rank: int) -> dict[str, float]:
    """method -> its peak MiB (run_one), each method in a fresh process of this script."""
    flags = [f"--batch={batch}", f"--length={length}", f"--tasks={tasks}", f"--d={d}", f"--rank={rank}"]
    peaks = {}
    for method in ("batched", "per_token_copy"):
        out = subprocess.run([sys.executable, __file__, "--method", method, *flags],
                             check=True, capture_output=True, text=True)
        peaks[method] = json.loads(out.stdout.strip().splitlines()[-1])
    return peaks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--tasks", type=int, default=4)
    parser.add_argument("--d", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--method", choices=["batched", "per_token_copy"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.method:
        print(json.dumps(run_one(args.method, args)))
        return
    # The two updates agree (same maths): checked on a small batch before measuring.
    x, a, b = torch.randn(3, 5, 16), torch.randn(2, 16, 4), torch.randn(2, 4, 16)
    index = torch.tensor([0, 1, 0])
    torch.testing.assert_close(lora(x, (a, b), index), per_token_copy(x, (a, b), index))
    peaks = measure(args.batch, args.length, args.tasks, args.d, args.rank)
    device = "cuda" if torch.cuda.is_available() else "cpu (peak RSS)"
    print(f"batch={args.batch} length={args.length} tasks={args.tasks} d={args.d} rank={args.rank} "
          f"device={device}")
    print(f"batched_peak_mib={peaks['batched']:.1f} per_token_copy_peak_mib="
          f"{peaks['per_token_copy']:.1f} ratio={peaks['per_token_copy'] / peaks['batched']:.1f}")


if __name__ == "__main__":
    main()
