"""Peak GPU memory of one HINT training step (default: HINT-xxl, the paper's 11B) on one GPU.

The step is the platform's own (`train_step`, Adafactor) on random tokens at the paper's SNI
lengths (instruction 1024, input 1024, target 256), with activation checkpointing. Weights in
bf16, not FSDP's fp32 master copy: xxl's fp32 weights and gradients alone (~96 GB) exceed an
H100; the figure says what one GPU holds for the model itself. Peak = the allocator's
high-water mark over the whole step, the optimizer's update included.

    python bench/peak_memory.py [--preset xxl] [--batch 4]

Last line: peak_gib=<x|nan> preset=<name> (nan on a CPU, where no allocator counts)
"""

from __future__ import annotations

import argparse
import time

import torch

from hint_model import HintConfig, HintModel
from hint_platform.config import TrainSection
from hint_platform.training.optim import build_optimizer
from hint_platform.training.parallel import parallelize
from hint_platform.training.worker import train_step


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xxl" if gpu else "tiny")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--hyper-len", type=int, default=1024 if gpu else 64)
    parser.add_argument("--input-len", type=int, default=1024 if gpu else 64)
    parser.add_argument("--target-len", type=int, default=256 if gpu else 16)
    args = parser.parse_args()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    dtype = torch.bfloat16 if gpu else torch.float32

    torch.manual_seed(0)
    start = time.perf_counter()
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # built in its training dtype, on the device: no fp32 copy
    try:
        with device:
            model = HintModel(HintConfig.preset(args.preset, variant="hint"))
    finally:
        torch.set_default_dtype(default)
    model = parallelize(model, device=device, fsdp=False, activation_checkpointing=True)
    train = TrainSection(optimizer="adafactor", lr=1e-3)
    optimizer = build_optimizer(model, train)
    params = sum(p.numel() for p in model.parameters())
    print(f"HINT-{args.preset}: {params / 1e9:.2f}B parameters in {str(dtype).removeprefix('torch.')}, "
          f"built in {time.perf_counter() - start:.0f} s; batch {args.batch}, lengths "
          f"{args.hyper_len} / {args.input_len} / {args.target_len}, activation checkpointing")

    vocab = model.config.vocab_size
    tokens = lambda n: torch.randint(2, vocab, (args.batch, n), device=device)  # noqa: E731
    hyper = tokens(args.hyper_len)[:1].expand(args.batch, -1)  # one task: one instruction
    batch = {"hyper_input_ids": hyper, "hyper_attention_mask": torch.ones_like(hyper),
             "input_ids": tokens(args.input_len), "labels": tokens(args.target_len)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    out = train_step(model, optimizer, [batch], train.grad_clip, train.z_loss)
    if gpu:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else float("nan")
    total = torch.cuda.get_device_properties(device).total_memory / 2**30 if gpu else float("nan")
    print(f"one step: {seconds:.1f} s, loss {float(out['loss']):.3f}; peak {peak:.1f} GiB of {total:.0f} GiB")
    print(f"peak_gib={peak:.1f} preset={args.preset}")


if __name__ == "__main__":
    main()
