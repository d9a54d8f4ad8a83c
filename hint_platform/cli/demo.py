"""`hint demo`: synthetic suite -> pretrain -> fine-tune T5 HINT and two baselines, and a small
Llama-style decoder's HINT, prompt and No-Instruct rows, on local Ray -> zero-shot evaluation on
held-out tasks -> registered model. Offline, about 10 minutes on 2 cores."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole platform end to end on this machine, offline (~10 minutes on 2 cores)",
        description="Generate a synthetic instruction suite, pretrain and fine-tune a small T5 HINT "
                    "and the No-Instruct and concatenation baselines on local Ray (2 workers, FSDP "
                    "on CPU); train a small Llama-style decoder from scratch with the instruction "
                    "in its prompt and fine-tune HINT-decoder and No-Instruct from it; evaluate "
                    "them zero-shot on held-out tasks (and HINT-decoder given random other "
                    "instructions), register the T5 HINT model in a local MLflow store. The last "
                    "line of output holds the figures.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", default="runs/demo", help="run directory (replaced if it exists)")
    p.add_argument("--quick", action="store_true",
                   help="a smoke version: a tiny suite, two steps and one worker per stage "
                        "(about 4 minutes on 2 cores)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hint_platform.recipes.demo import DemoSettings, run_demo

    run_demo(args.out, DemoSettings.quick() if args.quick else DemoSettings())
    return 0
