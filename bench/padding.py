"""How much of what the training step computes is padding, on the real SNI sample, before and
after the step's rows are sorted into micro-batches (pipelines.step_micro_batches).

The rows come in the platform's stream order (tasks interleaved, as `hint train` reads them),
HINT 'Def' at the paper's lengths (1024 / 1024 / 256), `--global-batch` rows a step on one
worker, cut into micro-batches of `--micro-batch`. A micro-batch is padded to its longest
input, target and instruction; HINT encodes each distinct instruction of a micro-batch once.
Padding fraction = padded positions / all positions, over instructions (the distinct ones
encoded), inputs and targets.

    python bench/padding.py [--global-batch 256 --micro-batch 8 --steps 5]

Last line: padding_before=<x> padding_after=<x> instructions_per_micro_before=<x> ..._after=<x>
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

from pipelines import iter_records
from pipelines.collate import step_micro_batches

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def cost(micro_batches: list[list[dict]]) -> tuple[int, int, int]:
    """(real positions, padded positions, distinct instructions) of the micro-batches."""
    real = padded = instructions = 0
    for rows in micro_batches:
        distinct = {tuple(r["hyper_input_ids"]) for r in rows}
        instructions += len(distinct)
        for lengths in ([len(h) for h in distinct], [len(r["input_ids"]) for r in rows],
                        [len(r["labels"]) for r in rows]):
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
    return real, padded - real, instructions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--global-batch", type=int, default=256)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--data", type=Path, default=SHARED,
                        help="a folder laid out as ../shared/data (sni/, tokenizer/t5/)")
    args = parser.parse_args()
    spec = {"kind": "sni", "path": str(args.data / "sni"), "split": "mini", "format": "def"}
    rows = iter_records([spec], str(args.data / "tokenizer" / "t5"), max_input_len=1024,
                        max_hyper_len=1024, max_target_len=256)
    totals = {"before": [0, 0, 0], "after": [0, 0, 0]}
    g, m = args.global_batch, args.micro_batch
    for _ in range(args.steps):
        step = list(itertools.islice(rows, g))
        if len(step) < g:
            break
        arranged = {"before": [step[i:i + m] for i in range(0, g, m)],
                    "after": step_micro_batches(step, m)}
        for name, micro in arranged.items():
            totals[name] = [a + b for a, b in zip(totals[name], cost(micro))]
    micro_batches = args.steps * g // m
    figures = {}
    for name, (real, pad, instructions) in totals.items():
        figures[f"padding_{name}"] = pad / (real + pad)
        figures[f"instructions_per_micro_{name}"] = instructions / micro_batches
        print(f"{name:6s}: {real:,} real positions, {pad:,} padding ({pad / (real + pad):.1%}), "
              f"{instructions / micro_batches:.2f} distinct instructions per micro-batch")
    print(f"real SNI sample, {args.steps} steps of {g} rows, micro-batches of {m}")
    print(" ".join(f"{k}={v:.3f}" for k, v in figures.items()))


if __name__ == "__main__":
    main()
