"""`hint flops`: the paper's Appendix C compute table: FLOPs per task of HINT against the
concatenation baselines, and the memory of the state a task keeps (hint_model.flops)."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "flops", help="compute per task of HINT vs concatenation (Appendix C)",
        description="FLOPs per task for n inputs: concatenation re-encodes the instruction with "
                    "every input, HINT encodes it once and generates modules once. Also the memory "
                    "of HINT's saved task state against a decoder-only KV cache of the instruction.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--preset", default="xl", help="size preset (tiny, small, base, large, xl, xxl)")
    p.add_argument("--variant", default="hint", help="HINT variant (hint, hint_no_fusion, ...)")
    p.add_argument("--instruction-len", type=int, default=256, help="instruction tokens (t)")
    p.add_argument("--input-len", type=int, default=128, help="input tokens (i)")
    p.add_argument("--output-len", type=int, default=32, help="output tokens (o)")
    p.add_argument("--num-inputs", type=int, nargs="+", default=[1, 10, 100, 1000], help="inputs per task (n)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hint_model import HintConfig, HintConfigError
    from hint_model.flops import task_cost
    from hint_platform.errors import UserError

    try:
        cfg = HintConfig.preset(args.preset, variant=args.variant)
    except HintConfigError as e:
        raise UserError(str(e)) from None
    t, i, o = args.instruction_len, args.input_len, args.output_len
    if min(t, i, o, *args.num_inputs) <= 0:
        raise UserError("lengths and --num-inputs must be positive")
    print(f"preset {args.preset}, variant {args.variant}: instruction {t}, input {i}, output {o} tokens")
    print(f"{'inputs n':>9}{'hint GFLOPs':>16}{'concat GFLOPs':>16}{'concat/hint':>13}")
    for n in args.num_inputs:
        cost = task_cost(cfg, n, t, i, o)
        print(f"{n:>9}{cost.hint / 1e9:>16.2f}{cost.concat / 1e9:>16.2f}{cost.speedup:>13.2f}")
    cost = task_cost(cfg, 1, t, i, o)
    print(f"task state (bf16): hint {cost.hint_state_bytes / 2**20:.2f} MiB "
          f"(generated modules{' + instruction' if cfg.fusion else ''}); "
          f"decoder-only KV cache of the instruction {cost.kv_cache_bytes / 2**20:.2f} MiB")
    return 0
