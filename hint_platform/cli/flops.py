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
    p.add_argument("--preset", default="xl", help="size preset (tiny, small, base, large, xl, xxl; "
                                                  "decoder-only: gpt2-xl, opt-13b, llama-3b, llama-tiny, llama-small)")
    p.add_argument("--against", default="xl", help="a decoder-only concat model's KV cache against "
                                                   "the task state of HINT at this T5 preset")
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
    if cfg.is_decoder_only and not cfg.hypernetwork:
        return run_decoder(cfg, args)
    print(f"{'inputs n':>9}{'hint GFLOPs':>16}{'concat GFLOPs':>16}{'concat/hint':>13}")
    for n in args.num_inputs:
        cost = task_cost(cfg, n, t, i, o)
        print(f"{n:>9}{cost.hint / 1e9:>16.2f}{cost.concat / 1e9:>16.2f}{cost.speedup:>13.2f}")
    cost = task_cost(cfg, 1, t, i, o)
    print(f"task state (bf16): hint {cost.hint_state_bytes / 2**20:.2f} MiB "
          f"(generated modules{' + instruction' if cfg.fusion else ''}); "
          f"decoder-only KV cache of the instruction {cost.kv_cache_bytes / 2**20:.2f} MiB")
    return 0


def run_decoder(cfg, args: argparse.Namespace) -> int:
    """A decoder-only model without a hypernetwork: the instruction re-read with every input
    against its keys / values computed once per task (2N per token, Kaplan et al.), and the
    memory of that cache against HINT's task state (Appendix C.2)."""
    from hint_model import HintConfig, HintConfigError
    from hint_model.flops import task_cost
    from hint_platform.errors import UserError

    t, i, o = args.instruction_len, args.input_len, args.output_len
    print(f"{'inputs n':>9}{'concat GFLOPs':>16}{'cached GFLOPs':>16}{'concat/cached':>15}")
    for n in args.num_inputs:
        cost = task_cost(cfg, n, t, i, o)
        print(f"{n:>9}{cost.concat / 1e9:>16.2f}{cost.cached_concat / 1e9:>16.2f}"
              f"{cost.concat / cost.cached_concat:>15.2f}")
    try:
        hint = task_cost(HintConfig.preset(args.against, variant="hint"), 1, t, i, o)
    except HintConfigError as e:
        raise UserError(f"--against: {e}") from None
    print(f"task state (bf16): the instruction's KV cache {task_cost(cfg, 1, t, i, o).kv_cache_bytes / 2**20:.2f} MiB; "
          f"HINT ({args.against}) {hint.hint_state_bytes / 2**20:.2f} MiB")
    return 0
