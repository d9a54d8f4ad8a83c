"""The decoder-only HINT model's LoRA training step: variant `lora_only` (the base reads each
instruction, the component generator writes LoRA on q and v per task, no fusion, no prefixes:
what `hint adapter` exports), timed as bench/train_step.py times HINT's step (its
`time_steps`: the platform's `train_step`, Adafactor, micro-batches cut as the worker cuts
them; on GPU FSDP of world size 1 with bf16 compute).

Sizes (--preset, a decoder-only size preset): on GPU `llama-3b`, Llama-3.2-3B's shape (3.2B
parameters, grouped-query attention, a 128k vocabulary), in T5-XL's role: the paper's HINT-3B
trains on one GPU. gpt2-xl (1.6B) is the paper's decoder-only baseline, but today's LoRA users
fine-tune Llama-style bases (Text-to-LoRA's are Llama-3.1-8B, Mistral-7B and Gemma-2-2B), and
an 8B base with its fp32 master weights, gradients and a generator does not leave one GPU room
for a step. On CPU `llama-tiny`.

Rows: random tokens; each example its own task unless --tasks says fewer (a mixed-task batch:
every example gets its task's LoRA through batched matmuls, hint_model.peft.lora). FLOPs:
hint_model.flops through the worker's `training_flops` (the generator once per distinct
instruction of a micro-batch; forward + backward = 3x forward), MFU against the device's dense
bf16 peak (hint_platform.training.throughput.peak_flops; nan on a CPU). Memory: the GPU's peak
over the timed steps, and per-example LoRA against a copy of A and B per token on the step's
micro-batch shape at the q projection's width, fp32 (bench/peft_memory.py, each in a fresh
process).

    python bench/decoder_lora_step.py                                 # CPU: llama-tiny, fp32
    python bench/decoder_lora_step.py --preset llama-3b --batch 8     # GPU: bf16 under FSDP

Last line: step_s=<x> tokens_per_s=<x> tflops_per_step=<x> peak_gib=<x|nan>
lora_batched_peak_mib=<x> lora_per_token_copy_peak_mib=<x> mfu=<x|nan>
"""

from __future__ import annotations

import argparse
import math
import os
import random

import torch
import torch.distributed as dist
from peft_memory import measure  # this folder's: per-example LoRA's peak memory
from train_step import start_fsdp, time_steps  # this folder's: HINT's training step, timed

from hint_model import SIZE_PRESETS, HintConfig, HintModel
from hint_platform.training.throughput import peak_flops
from hint_platform.training.worker import training_flops
from pipelines.collate import step_micro_batches

DECODER_PRESETS = [name for name, size in SIZE_PRESETS.items() if "model_type" in size]


def random_rows(vocab: int, batch: int, tasks: int, lengths: tuple[int, int, int]) -> list[dict]:
    """`batch` rows of random tokens, example e of task e % tasks; lengths (instruction,
    input, target)."""
    rng = random.Random(0)
    tokens = lambda n: [rng.randrange(2, vocab) for _ in range(n)]  # noqa: E731
    instruction_len, input_len, target_len = lengths
    instructions = [tokens(instruction_len) for _ in range(tasks)]
    return [{"task": f"task{e % tasks}", "hyper_input_ids": instructions[e % tasks],
             "input_ids": tokens(input_len), "labels": tokens(target_len)} for e in range(batch)]


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="llama-3b" if gpu else "llama-tiny",
                        help=f"a decoder-only size preset ({', '.join(DECODER_PRESETS)})")
    parser.add_argument("--batch", type=int, default=8 if gpu else 4, help="examples per step")
    parser.add_argument("--micro", type=int, default=None,
                        help="examples per micro-batch (default: the whole batch)")
    parser.add_argument("--tasks", type=int, default=None,
                        help="distinct instructions per step (default: one per example)")
    parser.add_argument("--steps", type=int, default=3 if gpu else 2)
    parser.add_argument("--instruction-len", type=int, default=256 if gpu else 32,
                        help="tokens (SNI's Def + 2 Pos. is about 180 T5 tokens)")
    parser.add_argument("--input-len", type=int, default=512 if gpu else 32)
    parser.add_argument("--target-len", type=int, default=128 if gpu else 8)
    parser.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16" if gpu else "fp32",
                        help="bf16: the platform's GPU training (FSDP, bf16 compute, fp32 master "
                             "weights); fp32: no FSDP")
    parser.add_argument("--compile", action="store_true", help="compile each block (train.compile)")
    args = parser.parse_args()
    if args.preset not in DECODER_PRESETS:
        parser.error(f"--preset {args.preset!r} is not a decoder-only size preset; one of "
                     f"{', '.join(DECODER_PRESETS)}")
    if args.dtype == "bf16" and not gpu:
        parser.error("--dtype bf16 is the platform's GPU mixed precision; this machine has no CUDA GPU")
    tasks = args.tasks or args.batch
    if not 1 <= tasks <= args.batch:
        parser.error(f"--tasks {tasks}: between 1 and --batch ({args.batch})")
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if args.dtype == "bf16":
        start_fsdp(device)

    config = HintConfig.preset(args.preset, variant="lora_only")
    lengths = (args.instruction_len, args.input_len, args.target_len)
    rows = random_rows(config.vocab_size, args.batch, tasks, lengths)
    micro_size = args.micro or args.batch
    micro_rows = step_micro_batches(rows, micro_size)
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"
    with torch.device("meta"):  # only counted
        shapes = HintModel(config)
        base = sum(p.numel() for p in shapes.base.parameters())
        generator = sum(p.numel() for p in shapes.generator.parameters())
    print(f"device: {name}; {args.dtype}; preset {args.preset} lora_only (LoRA rank "
          f"{config.lora_rank} on {', '.join(config.lora_targets)}): base {base / 1e6:,.1f}M + "
          f"generator {generator / 1e6:,.2f}M parameters; batch {args.batch} of {tasks} tasks in "
          f"micro-batches of {micro_size}; lengths instruction {args.instruction_len}, input "
          f"{args.input_len}, target {args.target_len}", flush=True)

    seconds, loss, kernels, peak = time_steps(config, micro_rows, device, args.steps, args.compile)
    if dist.is_initialized():
        dist.destroy_process_group()
    flops = training_flops(config, micro_rows)
    tokens = args.batch * sum(lengths)
    mfu = flops / seconds / peak_flops(device)
    print(f"step {seconds:.3f} s  {tokens / seconds:,.0f} tokens/s  {flops / 1e12:.3f} TFLOPs  "
          f"loss {loss:.3f}  mfu {mfu:.3f}  peak {peak:.1f} GiB  sdpa kernels {kernels}", flush=True)

    if gpu:
        torch.cuda.empty_cache()
    micro_tasks = max(len({tuple(r["hyper_input_ids"]) for r in m}) for m in micro_rows)
    lora = measure(micro_size, args.input_len + args.target_len, micro_tasks, config.d_model,
                   config.lora_rank)
    print(f"per-example LoRA, forward + backward of one q projection (fp32) on a micro-batch "
          f"({micro_size} x {args.input_len + args.target_len} tokens, {micro_tasks} tasks, "
          f"d {config.d_model}): batched {lora['batched']:.1f} MiB, a copy per token "
          f"{lora['per_token_copy']:.1f} MiB")
    print(f"step_s={seconds:.4f} tokens_per_s={tokens / seconds:.1f} "
          f"tflops_per_step={flops / 1e12:.4f} peak_gib={peak:.2f} "
          f"lora_batched_peak_mib={lora['batched']:.1f} "
          f"lora_per_token_copy_peak_mib={lora['per_token_copy']:.1f} "
          f"mfu={'nan' if math.isnan(mfu) else f'{mfu:.3f}'}")


if __name__ == "__main__":
    main()
