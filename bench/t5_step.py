"""Our T5 (hint_model) against transformers' T5ForConditionalGeneration, same shape, same weights.

Times a training step (forward + backward, no optimizer: it is the same for both) and
encoder-only inference, alternating the two models step by step so that machine noise hits
both alike, and reports medians. Device auto-detected; bf16 on GPU, fp32 on CPU. With
`--compile`, both models are then compiled regionally (each T5 block compiled in place, as
`train.compile` does in training) and timed again.

  python bench/t5_step.py                                  # CPU: small preset, ~1 minute
  python bench/t5_step.py --preset xl --batch 16 --input-len 512 --target-len 128 [--compile]

Also prints which scaled_dot_product_attention kernel our attention (relative-position bias as
an additive mask) runs in a training step: flash, efficient, cudnn or math.
Last line: train_speedup_vs_hf=<HF time / our time> infer_speedup_vs_hf=<same for inference>
[compiled_train_speedup_vs_hf=<HF compiled / ours compiled>]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from transformers import T5Config, T5ForConditionalGeneration

from hint_model import HintConfig, HintModel, checkpoint
from hint_model.flops import input_flops
from hint_platform.training.parallel import compile_blocks

PEAK_BF16_FLOPS = 989e12  # H100 SXM dense bf16, for the MFU figure on GPU


def build(preset: str, device: torch.device, dtype: torch.dtype):
    shape = HintConfig.preset(preset, variant="no_instruct")
    hf_cfg = T5Config(vocab_size=shape.vocab_size, d_model=shape.d_model, d_kv=shape.d_kv,
                      d_ff=shape.d_ff, num_layers=shape.num_layers,
                      num_decoder_layers=shape.num_decoder_layers, num_heads=shape.num_heads,
                      feed_forward_proj="gated-gelu", dropout_rate=0.0, decoder_start_token_id=0)
    torch.manual_seed(0)
    with device:
        hf = T5ForConditionalGeneration(hf_cfg)
        fields, state = checkpoint.t5_fields(hf.config.to_dict(), hf.state_dict())
        ours = HintModel(HintConfig.preset(preset, variant="no_instruct", **fields))
    checkpoint.load_t5_weights(ours.t5, state, "transformers model in memory")
    return hf.to(dtype).train(), ours.to(dtype).train()


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


# The ATen op each scaled_dot_product_attention backend dispatches to (as the profiler names it).
SDPA_OPS = {"_scaled_dot_product_flash_attention": "flash",
            "_scaled_dot_product_efficient_attention": "efficient",
            "_scaled_dot_product_cudnn_attention": "cudnn",
            "_scaled_dot_product_attention_math": "math",
            "_scaled_dot_product_fused_attention_overrideable": "fused"}


def sdpa_backends(fn) -> str:
    """The SDPA kernels `fn` (a training step) runs, by the ops the profiler records."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    found = {backend for op, backend in SDPA_OPS.items() if any(op in n for n in names)}
    return ",".join(sorted(found)) or "none"


def compile_hf(hf: T5ForConditionalGeneration) -> None:
    """transformers' T5 compiled the same regional way as ours: each block in place."""
    for block in [*hf.encoder.block, *hf.decoder.block]:
        block.compile()


def time_pairs(pairs: dict, device: torch.device, steps: int) -> dict:
    """name -> (transformers median s, ours median s), after one warm-up (and compilation)."""
    times = {}
    for name, pair in pairs.items():
        for fn in pair:
            timed(fn, device)
        runs = [[timed(fn, device) for fn in pair] for _ in range(steps)]
        times[name] = tuple(statistics.median(r[i] for r in runs) for i in range(2))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default=None, help="size preset (default: small on CPU, xl on GPU)")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--input-len", type=int, default=None)
    parser.add_argument("--target-len", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--compile", action="store_true",
                        help="then compile both models (each block) and time the training step again")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    dtype = torch.bfloat16 if gpu else torch.float32
    preset = args.preset or ("xl" if gpu else "small")
    batch = args.batch or (16 if gpu else 2)
    input_len = args.input_len or (512 if gpu else 64)
    target_len = args.target_len or (128 if gpu else 16)
    steps = args.steps or (10 if gpu else 3)

    hf, ours = build(preset, device, dtype)
    cfg = ours.config
    ids = torch.randint(2, cfg.vocab_size, (batch, input_len), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(2, cfg.vocab_size, (batch, target_len), device=device)

    def hf_train():
        hf(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss.backward()
        hf.zero_grad(set_to_none=True)

    def ours_train():
        ours(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        ours.zero_grad(set_to_none=True)

    @torch.no_grad()
    def hf_infer():
        hf.get_encoder()(input_ids=ids, attention_mask=mask)

    @torch.no_grad()
    def ours_infer():
        ours.t5.encode(ids, mask)

    print(f"device={device.type} dtype={str(dtype).removeprefix('torch.')} preset={preset} "
          f"batch={batch} input_len={input_len} target_len={target_len} compile={args.compile}")
    print(f"sdpa_backend={sdpa_backends(ours_train)} (ours, training step, position bias as mask)")
    times = time_pairs({"train": (hf_train, ours_train), "infer": (hf_infer, ours_infer)},
                       device, steps)
    print(f"train_speedup_vs_hf={times['train'][0] / times['train'][1]:.3f} (eager)")
    if args.compile:
        start = time.perf_counter()
        compile_hf(hf)
        compile_blocks(ours)
        compiled = time_pairs({"train": (hf_train, ours_train)}, device, steps)
        times["compiled train"] = compiled["train"]
        print(f"compiled (regional) and warmed up in {time.perf_counter() - start:.0f} s")

    step_flops = 3 * batch * input_flops(cfg, 0, input_len, target_len)  # fwd + bwd = 3x fwd
    tokens = batch * (input_len + target_len)
    for name, (hf_s, ours_s) in times.items():
        print(f"{name}: transformers {hf_s * 1e3:.1f} ms, ours {ours_s * 1e3:.1f} ms")
        if "train" in name:
            for label, seconds in (("transformers", hf_s), ("ours", ours_s)):
                mfu = f", MFU {step_flops / seconds / PEAK_BF16_FLOPS:.1%}" if gpu else ""
                print(f"  {name} {label}: {tokens / seconds:,.0f} tokens/s{mfu}")
    summary = (f"train_speedup_vs_hf={times['train'][0] / times['train'][1]:.3f} "
               f"infer_speedup_vs_hf={times['infer'][0] / times['infer'][1]:.3f}")
    if args.compile:
        hf_s, ours_s = times["compiled train"]
        summary += f" compiled_train_speedup_vs_hf={hf_s / ours_s:.3f}"
    print(summary)


if __name__ == "__main__":
    main()
