"""What resuming a run costs at an early and a late checkpoint: the time from the start of a
resumed `fit` (what `hint train` runs again under the same name) to its first step.

Data: a synthetic C4 stream (pipelines/synthetic.py's pretraining documents, a tokenizer trained
on them); model: HINT-tiny on the CPU, one Ray Train worker. For each checkpoint step S, a run
trains S steps with a checkpoint at S, then the same run is started again for one more step;
the time to that step's report (Ray Train's controller records it) includes starting the worker
group, restoring the checkpoint and reading the data stream up to the first unconsumed row.

    python bench/resume_cost.py [--steps 10 200] [--global-batch 32]

Last line: resume_first_step_s_at_<a>=<x> resume_first_step_s_at_<b>=<x> ratio=<b/a>
data_wait_s_at_<a>=<x> data_wait_s_at_<b>=<x> (the first step's wait for its batch: the data
stream's share, which on a busy machine the start-up's noise does not drown)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import ray
import ray.cloudpickle
from ray.train import UserCallback

from hint_platform.config import from_dict
from hint_platform.training.driver import fit
from pipelines import load_tokenizer, train_tokenizer, write_suite

# The callback runs in the Train controller, which cannot import this script as a module.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


class FirstReport(UserCallback):
    """On the Train controller: writes the wall-clock time of the run's first report and the
    seconds its step waited for data (the worker's own measure: from the loop's start to its
    first batch, the part of resuming that the data stream costs)."""

    def __init__(self, record: Path):
        self.record = record

    def after_report(self, run_context, metrics, checkpoint):
        if not self.record.exists():
            m = metrics[0]
            waited = m["data_wait_fraction"] * m["step_time_s"]
            self.record.write_text(json.dumps({"time": time.time(), "data_wait_s": waited}))


def config(root: Path, tokenizer: str, c4_path: str, name: str, steps: int, batch: int):
    vocab = load_tokenizer(tokenizer).vocab_size
    return from_dict({
        "name": name,
        "model": {"preset": "tiny", "variant": "hint", "overrides": {"vocab_size": vocab}},
        "data": {"tokenizer": tokenizer, "max_input_len": 64, "max_hyper_len": 64, "max_target_len": 32,
                 "train": [{"kind": "c4", "path": c4_path, "segment_len": 128}]},
        "train": {"num_workers": 1, "cpus_per_worker": 0.5, "global_batch_size": batch,
                  "micro_batch_size": batch, "max_steps": steps, "checkpoint_every": steps,
                  "log_every": steps},
        "run": {"storage_path": str(root / "runs"), "tracking_uri": (root / "mlruns").as_uri()},
    })


def resume_first_step_s(root: Path, tokenizer: str, c4_path: str, step: int, batch: int
                        ) -> tuple[float, float]:
    """(seconds to the resumed run's first step, of which its worker waited for data)."""
    name = f"resume-at-{step}"
    fit(config(root, tokenizer, c4_path, name, step, batch))
    record = root / f"{name}.first-report"
    start = time.time()
    fit(config(root, tokenizer, c4_path, name, step + 1, batch),
        run_config_callbacks=[FirstReport(record)])
    first = json.loads(record.read_text())
    return first["time"] - start, first["data_wait_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, nargs=2, default=[10, 200])
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--docs", type=int, default=20000, help="synthetic C4 documents")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="hint-resume-cost-"))
    os.environ["MLFLOW_ALLOW_FILE_STORE"] = "true"
    try:
        suite = write_suite(root / "suite", num_train_tasks=24, num_test_tasks=2,
                            instances_per_task=2, num_pretrain_docs=args.docs)
        train_tokenizer(suite.texts(), root / "tok", vocab_size=1000)
        if not ray.is_initialized():
            ray.init(num_cpus=4, object_store_memory=2**30, include_dashboard=False, log_to_driver=False)
        times, waits = {}, {}
        for step in args.steps:
            times[step], waits[step] = resume_first_step_s(root, str(root / "tok"), suite.c4_path,
                                                           step, args.global_batch)
            print(f"checkpoint at step {step} ({step * args.global_batch} rows consumed): resumed "
                  f"run's first step after {times[step]:.1f} s, {waits[step]:.1f} s of it waiting "
                  "for data", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    a, b = args.steps
    print(f"resume_first_step_s_at_{a}={times[a]:.2f} resume_first_step_s_at_{b}={times[b]:.2f} "
          f"ratio={times[b] / times[a]:.2f} data_wait_s_at_{a}={waits[a]:.2f} "
          f"data_wait_s_at_{b}={waits[b]:.2f}")


if __name__ == "__main__":
    main()
