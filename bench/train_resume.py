"""HINT trained through the platform (`fit`, what `hint train` runs: Ray Train, FSDP2, Adafactor,
a DCP checkpoint) with its worker SIGKILLed after a checkpoint, and the run resumed.

One worker (world size 1), activation checkpointing, `--compile` for regional compilation;
on a GPU bf16 compute with fp32 master weights. Data: the real SNI sample (HINT 'Def',
the paper's lengths 1024 / 1024 / 256) from --data (laid out as ../shared/data), else the
synthetic suite. A checkpoint every --checkpoint-every steps; after the report of --kill-after
the Train controller kills the worker; Ray Train restarts it from the last checkpoint
(train.max_failures=1). Throughput and MFU are the platform's own reports (every --log-every
steps); `clean` intervals leave out the first of each worker start (warm-up, compilation) and
those that held a checkpoint save.

The run keeps 4 model copies (two checkpoints, the export, its MLflow copy): the run folder
goes where the most space is free (/dev/shm or the temp dir), and a preset that does not fit
there is replaced by the next smaller one, which the output says.

    python bench/train_resume.py [--preset xl --compile] [--steps 30]

Last line: resume_ok=<0|1> tokens_per_s=<x> mfu=<x|nan> preset=<name>
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
from pathlib import Path

import psutil
import ray
import ray.cloudpickle
import torch
from ray.train import UserCallback

from hint_model import HintConfig, HintModel
from hint_platform.config import from_dict
from hint_platform.training.driver import fit
from pipelines import load_tokenizer, train_tokenizer, write_suite

# The callback runs in the Train controller, which cannot import this script as a module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
PRESETS = ("xxl", "xl", "large", "base", "small", "tiny")
COPIES = 4.5  # model-sized files at the peak: 2 checkpoints, the export, its MLflow copy; margin


class KillAfter(UserCallback):
    """On the Train controller: records every report (one JSON line each) and SIGKILLs the Train
    worker once, after the report of step `step` (controller and workers share the raylet)."""

    def __init__(self, step: int, log: Path):
        self.step = step
        self.log = log
        self.done = False

    def after_report(self, run_context, metrics, checkpoint):
        report = dict(metrics[0], checkpoint=checkpoint is not None, killed=False)
        if not self.done and report.get("step") == self.step:
            workers = [p for p in psutil.Process(os.getppid()).children()
                       if "RayTrainWorker" in " ".join(p.cmdline())]
            os.kill(workers[-1].pid, signal.SIGKILL)
            report["killed"] = self.done = True
        with open(self.log, "a") as f:
            f.write(json.dumps(report) + "\n")


def model_bytes(preset: str, vocab: int) -> int:
    with torch.device("meta"):
        model = HintModel(HintConfig.preset(preset, variant="hint", vocab_size=vocab))
    return 4 * sum(p.numel() for p in model.parameters())  # fp32 master weights


def roomiest() -> Path:
    """/dev/shm or the temp dir, whichever has more space free."""
    places = [Path(p) for p in ("/dev/shm", tempfile.gettempdir()) if Path(p).is_dir()]
    return max(places, key=lambda p: shutil.disk_usage(p).free)


def sources(data: Path, workdir: Path) -> tuple[dict, str, str]:
    """(training source, tokenizer dir, where they come from)."""
    if (data / "sni").is_dir():
        spec = {"kind": "sni", "path": str(data / "sni"), "split": "mini", "format": "def"}
        return spec, str(data / "tokenizer" / "t5"), "real SNI sample"
    suite = write_suite(workdir / "suite", num_train_tasks=24, num_test_tasks=2,
                        instances_per_task=40, num_pretrain_docs=4)
    train_tokenizer(suite.texts(), workdir / "tok", vocab_size=1000)
    return suite.sni_spec("def"), str(workdir / "tok"), "synthetic suite"


def resumed(reports: list[dict], checkpoint_every: int) -> bool:
    """The worker was killed and the next report came from a worker restored from the last
    checkpoint before the kill (its first step after it), not from a fresh start."""
    kills = [i for i, r in enumerate(reports) if r["killed"]]
    if not kills or kills[0] + 1 >= len(reports):
        return False
    killed_at = reports[kills[0]]["step"]
    restored = max(r["step"] for r in reports[:kills[0] + 1] if r["checkpoint"])
    first_after = reports[kills[0] + 1]["step"]
    return restored < first_after <= killed_at and restored % checkpoint_every == 0


def clean(reports: list[dict]) -> list[dict]:
    """Reports whose interval held only training steps: not the first after a (re)start and
    not after a checkpoint save."""
    out = []
    for before, report in zip(reports, reports[1:]):
        if not (before["killed"] or before["checkpoint"]):
            out.append(report)
    return out


def main() -> None:
    gpu = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="xl" if gpu else "tiny")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--checkpoint-every", type=int, default=15)
    parser.add_argument("--kill-after", type=int, default=20)
    parser.add_argument("--log-every", type=int, default=5)
    parser.add_argument("--global-batch", type=int, default=16 if gpu else 4)
    parser.add_argument("--micro-batch", type=int, default=8 if gpu else 2)
    parser.add_argument("--compile", action="store_true", help="train.compile=true")
    parser.add_argument("--data", type=Path, default=SHARED,
                        help="a folder laid out as ../shared/data (sni/, tokenizer/t5/)")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="hint-train-resume-", dir=roomiest()))
    log = root / "reports.jsonl"
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"  # mlflow-skinny on the GPU image: no SQLite
    preset, result = args.preset, None
    try:
        spec, tokenizer, origin = sources(args.data, root)
        vocab = load_tokenizer(tokenizer).vocab_size
        free = shutil.disk_usage(root).free
        while COPIES * model_bytes(preset, vocab) > free and preset != PRESETS[-1]:
            print(f"{preset}: {COPIES:g} copies of {model_bytes(preset, vocab) / 2**30:.1f} GiB do "
                  f"not fit in {free / 2**30:.0f} GiB free under {root.parent}")
            preset = PRESETS[PRESETS.index(preset) + 1]
        print(f"training HINT-{preset} on {'GPU' if gpu else 'CPU'}, {origin}, run folder {root}")
        lengths = (dict(max_input_len=1024, max_hyper_len=1024, max_target_len=256) if gpu else
                   dict(max_input_len=64, max_hyper_len=64, max_target_len=16))
        cfg = from_dict({
            "name": "train-resume",
            "model": {"preset": preset, "variant": "hint", "overrides": {"vocab_size": vocab}},
            "data": {"tokenizer": tokenizer, "train": [spec], **lengths},
            "train": {"num_workers": 1, "use_gpu": gpu, "cpus_per_worker": 1 if gpu else 0.5,
                      "global_batch_size": args.global_batch, "micro_batch_size": args.micro_batch,
                      "max_steps": args.steps, "checkpoint_every": args.checkpoint_every,
                      "log_every": args.log_every, "optimizer": "adafactor",
                      "activation_checkpointing": True, "compile": args.compile,
                      "max_failures": 1},
            "run": {"storage_path": str(root / "runs"),
                    "tracking_uri": (root / "mlruns").as_uri()},
        })
        if not ray.is_initialized():
            ray.init(num_cpus=max(4, os.cpu_count() or 1), object_store_memory=2 * 2**30,
                     log_to_driver=False)
        result = fit(cfg, run_config_callbacks=[KillAfter(args.kill_after, log)])
    finally:  # also when the run fails or is interrupted: what it reported so far
        reports = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
        for r in reports:
            print(f"step {r['step']:3d}  loss {r['loss']:.3f}  step {r['step_time_s']:.2f} s  "
                  f"{r['tokens_per_s']:,.0f} tokens/s  mfu {r['mfu']:.3f}"
                  f"{'  checkpoint' if r['checkpoint'] else ''}"
                  f"{'  -> worker killed' if r['killed'] else ''}")
        if reports:
            ok = (result is not None and result.steps_done == args.steps
                  and resumed(reports, args.checkpoint_every))
            steady = clean(reports) or reports
            tokens = statistics.median(r["tokens_per_s"] for r in steady)
            mfu = statistics.median(r["mfu"] for r in steady)
            print(f"steps done {result.steps_done if result else 'none (the run failed)'}; "
                  f"clean intervals at steps {[r['step'] for r in steady]}")
            print(f"resume_ok={int(ok)} tokens_per_s={tokens:.0f} "
                  f"mfu={'nan' if math.isnan(mfu) else f'{mfu:.3f}'} preset={preset}")


if __name__ == "__main__":
    main()
