"""HINT with its cached task state against the concatenation baseline, same underlying model.

One task at SNI "Def + 2 Pos" lengths: the instruction, input and output token lengths are
the medians over the real task files in ../shared/data/sni (T5 tokenizer in
../shared/data/tokenizer/t5) when present, else the fallback lengths below. The baseline
(Tk-Instruct) reads instruction + input for every input; HINT generates the task's state once
(TaskModules: PEFT weights + the fused instruction's cross-attention keys / values) and then
reads the input alone. Both decode exactly the output length (EOS is never emitted), greedy,
with the decoder's KV cache, in batches of --batch-size. Time for n = 1, 10, 100 inputs (the
state's generation is inside HINT's time) at each of --output-lens (the median output, 2 tokens
on the SNI sample, where a step is latency-bound; on GPU also 256, the length the paper's SNI
evaluation decodes to, reference gins/ni_eval.gin), and the paper's Figure 4 (Section 6.2): time
for 100 inputs as the instruction grows with 0, 1, 2, 4, 8 positive examples. On CPU the time is
this process's CPU time with --threads torch threads (default 1): on a shared machine wall
time measures the neighbours' load; on GPU it is wall time (synchronised). Both plots are
PNGs; with $MLFLOW_TRACKING_URI set they and the figures are logged to MLflow (experiment
hint-bench).

  python bench/inference.py                             # CPU: small preset, fp32, ~3 minutes
  python bench/inference.py --preset xl --dtype bf16    # GPU

Last line: hint_speedup_at_1=<x> hint_speedup_at_10=<x> hint_speedup_at_100=<x> flops_ratio_at_100=<x>
(at the median output length) [hint_speedup_at_100_o<O>=<x> flops_ratio_at_100_o<O>=<x> per other length]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from hint_model import HintConfig, HintModel
from hint_model.flops import task_cost
from pipelines import formats, load_tokenizer

REPO = Path(__file__).resolve().parent.parent
SNI = REPO.parent / "shared" / "data" / "sni" / "tasks"
T5_TOKENIZER = REPO.parent / "shared" / "data" / "tokenizer" / "t5"
# Without the task files: lengths of the same order as the SNI sample's medians (definition,
# one positive example block, instance input, output), in T5 tokens.
FALLBACK = {"definition": 17, "positive_example": 80, "input": 64, "output": 2}
SHOTS = (0, 1, 2, 4, 8)
PAPER_OUTPUT_LEN = 256  # what the paper's SNI evaluation decodes to (reference gins/ni_eval.gin)


def sni_lengths() -> tuple[dict[str, float], str]:
    """Median token lengths over the real task files: the definition block, one positive
    example block (so k shots cost definition + k blocks, past the examples a file holds),
    the instance input and its first output."""
    if not (SNI.is_dir() and T5_TOKENIZER.is_dir()):
        return dict(FALLBACK), "fallback lengths (no ../shared/data/sni)"
    tok = load_tokenizer(T5_TOKENIZER)
    definition, example, inputs, outputs = [], [], [], []
    for path in sorted(SNI.glob("*.json")):
        task = json.loads(path.read_text())
        definition.append(len(tok.encode(formats.sni_def_pos_hyper(task["Definition"][0], [], 0, lambda text: True))))
        for number, positive in enumerate(task["Positive Examples"], start=1):
            example.append(len(tok.encode(formats.positive_example(number, positive), eos=False)))
        for instance in task["Instances"][:100]:
            inputs.append(len(tok.encode(instance["input"])))
            outputs.append(len(tok.encode(instance["output"][0])))
    medians = {"definition": definition, "positive_example": example, "input": inputs, "output": outputs}
    return {k: statistics.median(v) for k, v in medians.items()}, f"medians of {len(definition)} SNI task files"


def build(preset: str, dtype: torch.dtype, device: torch.device) -> tuple[HintModel, HintModel]:
    """HINT and the concatenation baseline on ONE underlying T5 (same weights). EOS is an id
    the models never emit, so every output is exactly max_new_tokens long."""
    torch.manual_seed(0)
    with device:
        hint = HintModel(HintConfig.preset(preset, variant="hint", eos_token_id=-1))
        concat = HintModel(HintConfig.preset(preset, variant="concat", eos_token_id=-1))
    concat.t5.load_state_dict(hint.t5.state_dict())
    return hint.to(dtype).eval(), concat.to(dtype).eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def clock(device: torch.device) -> float:
    return time.perf_counter() if device.type == "cuda" else time.process_time()


@torch.no_grad()
def run_hint(model: HintModel, n: int, t: int, i: int, o: int, batch: int, device) -> float:
    vocab = model.config.vocab_size
    sync(device)
    start = clock(device)
    modules = model.generate_modules(torch.randint(2, vocab, (1, t), device=device))
    for first in range(0, n, batch):
        ids = torch.randint(2, vocab, (min(batch, n - first), i), device=device)
        model.generate(ids, modules=modules, max_new_tokens=o)
    sync(device)
    return clock(device) - start


@torch.no_grad()
def run_concat(model: HintModel, n: int, t: int, i: int, o: int, batch: int, device) -> float:
    vocab = model.config.vocab_size
    sync(device)
    start = clock(device)
    for first in range(0, n, batch):
        ids = torch.randint(2, vocab, (min(batch, n - first), t + i), device=device)
        model.generate(ids, max_new_tokens=o)
    sync(device)
    return clock(device) - start


def best_of(fn, repeats: int) -> float:
    return min(fn() for _ in range(repeats))


def n_series(hint, concat, ns, t: int, i: int, o: int, batch: int, device, repeats: int) -> dict[str, list[float]]:
    """Time for each n of `ns` inputs of one task, both models, outputs of o tokens."""
    times: dict[str, list[float]] = {"HINT (state cached)": [], "concatenation": []}
    for n in ns:
        h = best_of(lambda: run_hint(hint, n, t, i, o, batch, device), repeats)
        c = best_of(lambda: run_concat(concat, n, t, i, o, batch, device), repeats)
        times["HINT (state cached)"].append(h)
        times["concatenation"].append(c)
        flops = task_cost(hint.config, n, t, i, o)
        print(f"output {o:>3}, n={n:>3}: hint {h:7.3f} s  concat {c:7.3f} s  speedup {c / h:5.2f}  "
              f"(FLOPs ratio {flops.speedup:5.2f})", flush=True)
    return times


def plot(path: Path, xs, series: dict[str, list[float]], xlabel: str, title: str, log: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, ys in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    if log:
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("time (s)")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def timing_parser(doc: str) -> argparse.ArgumentParser:
    """The options every inference timing here takes (bench/decoder_inference.py too)."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--preset", default=None, help="size preset (default: small on CPU, xl on GPU)")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default=None,
                        help="default: fp32 on CPU, bf16 on GPU")
    parser.add_argument("--batch-size", type=int, default=None, help="default: 20 on CPU, 100 on GPU")
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per point")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    return parser


def timing_setup(args) -> tuple[torch.device, str, torch.dtype, int]:
    """(device, preset, dtype, batch) from timing_parser's options: the GPU when there is one."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    preset = args.preset or ("xl" if gpu else "small")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype or ("bf16" if gpu else "fp32")]
    return device, preset, dtype, args.batch_size or (100 if gpu else 20)


def main() -> None:
    parser = timing_parser(__doc__)
    parser.add_argument("--out", default="runs/bench/inference", help="where the plots go")
    parser.add_argument("--output-lens", default=None,
                        help=f"comma-separated output lengths; 'median' is the SNI median (default: median on "
                             f"CPU, median,{PAPER_OUTPUT_LEN} on GPU)")
    args = parser.parse_args()

    device, preset, dtype, batch = timing_setup(args)
    gpu = device.type == "cuda"
    lengths, where = sni_lengths()
    shot_len = {k: round(lengths["definition"] + k * lengths["positive_example"]) for k in SHOTS}
    t, i, o = shot_len[2], round(lengths["input"]), max(1, round(lengths["output"]))
    spec = args.output_lens or ("median," + str(PAPER_OUTPUT_LEN) if gpu else "median")
    output_lens = [o if x.strip() == "median" else int(x) for x in spec.split(",")]
    timing = "wall time" if gpu else f"process CPU time, {args.threads} thread(s)"
    print(f"{preset} {str(dtype).removeprefix('torch.')} on {device} ({timing}), batch {batch}; {where}: "
          f"instruction (Def + 2 Pos) {t}, input {i}, output {o} tokens (median); output lengths "
          f"timed: {', '.join(map(str, output_lens))}", flush=True)
    hint, concat = build(preset, dtype, device)
    run_hint(hint, 2, t, i, o, batch, device)  # warm-up: allocator, kernels
    run_concat(concat, 2, t, i, o, batch, device)

    ns = (1, 10, 100)
    series = {length: n_series(hint, concat, ns, t, i, length, batch, device, args.repeats) for length in output_lens}
    times = series[output_lens[0]]
    o = output_lens[0]

    shots: dict[str, list[float]] = {"HINT (state cached)": [], "concatenation": []}
    for k in SHOTS:
        h = run_hint(hint, 100, shot_len[k], i, o, batch, device)
        c = run_concat(concat, 100, shot_len[k], i, o, batch, device)
        shots["HINT (state cached)"].append(h)
        shots["concatenation"].append(c)
        print(f"{k} shots (instruction {shot_len[k]} tokens), 100 inputs: hint {h:7.3f} s  "
              f"concat {c:7.3f} s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    latency_png, shots_png = out / "latency_vs_n.png", out / "figure4_shots.png"
    plot(latency_png, ns, times, "inputs of one task (n)", f"{preset}: Def + 2 Pos, {device.type}", log=True)
    plot(shots_png, SHOTS, shots, "positive examples in the instruction", f"{preset}: 100 inputs (Figure 4)",
         log=False)
    speedups = {n: c / h for n, h, c in zip(ns, times["HINT (state cached)"], times["concatenation"])}
    ratio = task_cost(hint.config, 100, t, i, o).speedup
    print(f"plots: {latency_png} {shots_png}")
    print(f"measured / FLOPs at n=100: {speedups[100] / ratio:.2f} (goal: within 0.75..1.25)")
    if os.environ.get("MLFLOW_TRACKING_URI"):
        import mlflow

        mlflow.set_experiment("hint-bench")
        with mlflow.start_run(run_name=f"inference-{preset}-{device.type}") as run:
            mlflow.log_params({"preset": preset, "dtype": str(dtype), "device": device.type, "batch": batch,
                               "instruction_len": t, "input_len": i, "output_len": o, "lengths": where})
            mlflow.log_metrics({f"hint_speedup_at_{n}": s for n, s in speedups.items()}
                               | {"flops_ratio_at_100": ratio}
                               | {f"shots_{k}_hint_s": v for k, v in zip(SHOTS, shots["HINT (state cached)"])}
                               | {f"shots_{k}_concat_s": v for k, v in zip(SHOTS, shots["concatenation"])})
            mlflow.log_artifact(str(latency_png), "plots")
            mlflow.log_artifact(str(shots_png), "plots")
        print(f"MLflow run {run.info.run_id}: plots/{latency_png.name}, plots/{shots_png.name}")
    others = ""
    for length in output_lens[1:]:
        h, c = series[length]["HINT (state cached)"][-1], series[length]["concatenation"][-1]
        others += (f" hint_speedup_at_100_o{length}={c / h:.2f} "
                   f"flops_ratio_at_100_o{length}={task_cost(hint.config, 100, t, i, length).speedup:.2f}")
    print(f"hint_speedup_at_1={speedups[1]:.2f} hint_speedup_at_10={speedups[10]:.2f} "
          f"hint_speedup_at_100={speedups[100]:.2f} flops_ratio_at_100={ratio:.2f}{others}")


if __name__ == "__main__":
    main()
