"""A HINT training step against the concatenation baseline's step on the same examples.

Both read the same SNI instances with two positive examples (the paper's Def + 2 Pos): HINT's
hypernetwork reads the definition and the examples once and the model reads the instance;
the baseline reads everything concatenated (Tk-Instruct). Same underlying preset, the same
step function as `hint train` (hint_platform.training.worker.train_step) over micro-batches
cut as the worker cuts them (pipelines.step_micro_batches: rows of one instruction together),
both in one run. Examples come from the real SNI sample in ../shared/data when it is there,
else from the synthetic suite.

HINT's step costs more FLOPs than concat's when a micro-batch holds many tasks: the generator
runs once per distinct instruction (at xl about 2 TFLOPs for 380 tokens, more than concat's
whole forward of one example). So the bench prints the FLOPs ratio of the two steps beside the
time ratio, and the distinct instructions per micro-batch.

CPU: the `small` preset in fp32. GPU: `xl` in bf16 under FSDP (world size 1), with MFU from
hint_model.flops. Last line: `hint_over_concat_step=<HINT / concat step time>
hint_over_concat_flops=<HINT / concat step FLOPs> mfu=<x|nan>`.

    python bench/train_step.py [--preset small] [--batch 4] [--micro 2] [--steps 3] [--compile]
"""

from __future__ import annotations

import argparse
import math
import os
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from hint_model import HintConfig, HintModel
from hint_platform.config import TrainSection
from hint_platform.training.optim import build_optimizer
from hint_platform.training.parallel import parallelize
from hint_platform.training.throughput import peak_flops
from hint_platform.training.worker import train_step, training_flops
from t5_step import sdpa_backends  # this folder's: the attention kernels a step runs
from pipelines import iter_records, load_tokenizer, train_tokenizer, write_suite
from pipelines.collate import collate, step_micro_batches

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
LENGTHS = dict(max_input_len=1024, max_hyper_len=1024, max_target_len=256)  # the paper's SNI


def sources(workdir: Path, shared: Path = SHARED) -> tuple[dict, str, str]:
    """(SNI spec without format, tokenizer dir, where they come from)."""
    if (shared / "sni").is_dir():
        spec = {"kind": "sni", "path": str(shared / "sni"), "split": "mini"}
        return spec, str(shared / "tokenizer" / "t5"), "real SNI sample"
    suite = write_suite(workdir / "suite", num_train_tasks=24, num_test_tasks=2,
                        instances_per_task=8, num_pretrain_docs=4)
    train_tokenizer(suite.texts(), workdir / "tok", vocab_size=1000)
    spec = {k: v for k, v in suite.sni_spec().items() if k != "format"}
    return spec, str(workdir / "tok"), "synthetic suite"


def examples(spec: dict, tokenizer: str, batch: int) -> dict[str, list[dict]]:
    """The first `batch` examples, formatted for HINT (Def + 2 Pos) and for concatenation."""
    out = {}
    for variant, fmt in (("hint", "def_pos"), ("concat", "concat")):
        rows = iter_records([{**spec, "format": fmt, "num_pos": 2}], tokenizer, **LENGTHS)
        out[variant] = [row for _, row in zip(range(batch), rows)]
    same = [(r["task"], r["labels"]) for r in out["hint"]] == \
           [(r["task"], r["labels"]) for r in out["concat"]]
    assert same, "the HINT and concat streams must hold the same examples"
    return out


def start_fsdp(device: torch.device) -> None:
    """A process group of world size 1 on the GPU: bf16 compute through the same sharding code
    as training (hint_platform.training.parallel)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", rank=0, world_size=1)


def time_steps(config: HintConfig, micro_rows: list[list[dict]], device, steps: int,
               compile_model: bool):
    """Seconds per training step of a model of `config` over `micro_rows` (after one warm-up
    step), the last loss, the SDPA kernels the step runs (t5_step.sdpa_backends) and the GPU's
    peak GiB over the timed steps (nan on a CPU). A decoder-only model's rows are collated in
    its causal layout, as the worker collates them."""
    torch.manual_seed(0)
    with device:  # initialised where it runs: an xl model's init on the CPU takes minutes
        model = HintModel(config)
    model = parallelize(model, device=device, fsdp=dist.is_initialized(),
                        activation_checkpointing=False, compile=compile_model)
    train = TrainSection(optimizer="adafactor", lr=1e-3)
    optimizer = build_optimizer(model, train)
    causal = config.is_decoder_only
    micro = [{k: v.to(device) for k, v in collate(rows, causal=causal).items()} for rows in micro_rows]
    step = lambda: train_step(model, optimizer, micro, train.grad_clip, train.z_loss, causal)  # noqa: E731
    kernels = sdpa_backends(step)  # the warm-up step, profiled for the attention kernels it runs
    gpu = device.type == "cuda"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    sync()
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(steps):
        loss = step()["loss"]
    sync()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if gpu else math.nan
    del model, optimizer
    return seconds, float(loss), kernels, peak


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xl" if gpu else "small")
    parser.add_argument("--batch", type=int, default=8 if gpu else 2, help="examples per step")
    parser.add_argument("--micro", type=int, default=None,
                        help="examples per micro-batch (default: the whole batch)")
    parser.add_argument("--steps", type=int, default=5 if gpu else 2)
    parser.add_argument("--compile", action="store_true", help="compile each block (train.compile)")
    parser.add_argument("--data", type=Path, default=SHARED,
                        help="a folder laid out as ../shared/data (sni/, tokenizer/t5/)")
    args = parser.parse_args()
    device = torch.device("cuda", 0) if gpu else torch.device("cpu")
    if gpu:
        start_fsdp(device)
    with tempfile.TemporaryDirectory() as tmp:
        spec, tokenizer, origin = sources(Path(tmp), args.data)
        rows = examples(spec, tokenizer, args.batch)
        vocab = load_tokenizer(tokenizer).vocab_size
    name = torch.cuda.get_device_name(device) if gpu else f"CPU ({os.cpu_count()} cores)"
    micro_size = args.micro or args.batch
    print(f"device: {name}; preset {args.preset}; batch {args.batch} in micro-batches of "
          f"{micro_size}; {origin}")
    times, flops = {}, {}
    for variant in ("hint", "concat"):
        r = rows[variant]
        micro_rows = step_micro_batches(r, micro_size)
        mean = lambda key: sum(len(x[key]) for x in r) / len(r)  # noqa: E731
        tasks = sum(len({tuple(x["hyper_input_ids"]) for x in m}) for m in micro_rows) / len(micro_rows)
        config = HintConfig.preset(args.preset, variant=variant, vocab_size=vocab)
        seconds, loss, kernels, peak = time_steps(config, micro_rows, device, args.steps,
                                                    args.compile)
        times[variant], flops[variant] = seconds, training_flops(config, micro_rows)
        mfu = flops[variant] / seconds / peak_flops(device)
        print(f"{variant:6s} step {seconds:.3f} s  {flops[variant] / 1e12:.2f} TFLOPs  loss {loss:.3f}  "
              f"mean lengths: instruction {mean('hyper_input_ids'):.0f}, input "
              f"{mean('input_ids'):.0f}, target {mean('labels'):.0f}  instructions per "
              f"micro-batch {tasks:.1f}  mfu {mfu:.3f}  peak {peak:.1f} GiB  sdpa kernels {kernels}")
        if variant == "hint":
            hint_mfu = mfu
    if gpu:
        dist.destroy_process_group()
    print(f"hint_over_concat_step={times['hint'] / times['concat']:.3f} "
          f"hint_over_concat_flops={flops['hint'] / flops['concat']:.3f} "
          f"mfu={'nan' if math.isnan(hint_mfu) else f'{hint_mfu:.3f}'}")

if __name__ == "__main__":
    main()
