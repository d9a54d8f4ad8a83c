"""Evaluation and batch prediction through the platform, on the accelerator Ray assigns.

An untrained HINT of --preset with the T5 vocabulary (../shared/data/tokenizer/t5, else the
synthetic suite's tokenizer) is exported, then:
  1. `evaluate_export` (what `hint eval` and `hint paper run` call): the SNI sample's test
     tasks spread over Ray workers, one per GPU (one on a CPU-only machine), the model in bf16
     on the GPU Ray assigned; examples per second of the whole call (records read, workers
     started and loaded, tasks predicted, scored);
  2. `hint predict` (serving/batch.py) on the same rows: rows per second, and where it ran.
Outputs are decoded up to --max-new-tokens (an untrained model rarely stops early).

  python bench/evaluation.py --preset tiny --max-per-task 2     # CPU smoke: ~1 minute
  python bench/evaluation.py --preset xl                        # GPU

Last line: eval_examples_per_s=<x> predict_rows_per_s=<x> eval_device=<cuda:0|cpu>
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import ray
import torch

from hint_model import HintConfig, HintModel
from hint_platform import config, export
from hint_platform.evaluation.evaluate import evaluate_export
from hint_platform.serving.batch import PredictOptions, predict
from pipelines import load_tokenizer, train_tokenizer, write_suite

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared" / "data"


def data_and_tokenizer(data: Path, work: Path) -> tuple[dict, Path, str]:
    """(an SNI test-part source spec, a tokenizer directory, where they came from)."""
    if (data / "sni" / "tasks").is_dir() and (data / "tokenizer" / "t5").is_dir():
        return ({"kind": "sni", "path": str(data / "sni"), "split": "mini", "part": "test"},
                data / "tokenizer" / "t5", f"SNI sample in {data}")
    suite = write_suite(work / "suite", num_train_tasks=21, num_test_tasks=4, instances_per_task=20,
                        num_pretrain_docs=5)
    train_tokenizer(suite.texts(), work / "tok", vocab_size=1000)
    return suite.sni_spec(part="test"), work / "tok", "the synthetic suite"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    gpu = torch.cuda.is_available()
    parser.add_argument("--preset", default="xl" if gpu else "tiny")
    parser.add_argument("--data", type=Path, default=SHARED, help="holds sni/ and tokenizer/t5")
    parser.add_argument("--max-per-task", type=int, default=20, help="test examples per task")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=32 if gpu else 8)
    args = parser.parse_args()

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory(prefix="hint-bench-eval-") as tmp:
        work = Path(tmp)
        spec, tokenizer_dir, where = data_and_tokenizer(args.data, work)
        spec = {**spec, "max_per_task": args.max_per_task}
        tok = load_tokenizer(tokenizer_dir)
        cfg_model = HintConfig.preset(args.preset, vocab_size=tok.vocab_size)
        torch.manual_seed(0)
        with torch.device("cuda" if gpu else "cpu"):  # built on the GPU: no minutes of CPU init
            model = HintModel(cfg_model).to(torch.bfloat16 if gpu else torch.float32)
        export.write(model, work / "export", tokenizer_dir)
        del model
        torch.cuda.empty_cache() if gpu else None
        print(f"HINT-{args.preset} export written; data: {where}, {args.max_per_task} examples a task, "
              f"outputs up to {args.max_new_tokens} tokens, batch {args.batch_size}", flush=True)

        ray.init(include_dashboard=False, log_to_driver=False)
        cfg = config.load("demo/finetune", [f"data.eval=[{json.dumps(spec)}]", "data.max_hyper_len=1024",
                                            "data.max_input_len=1024", f"data.max_target_len={args.max_new_tokens}"])
        start = time.perf_counter()
        report = evaluate_export(work / "export", cfg, batch_size=args.batch_size,
                                 max_new_tokens=args.max_new_tokens, progress=print)
        eval_seconds = time.perf_counter() - start
        examples = len(report.predictions)
        devices = sorted({w["device"] for w in report.workers})
        print(f"evaluate_export: {examples} examples of {len(report.per_task)} tasks in {eval_seconds:.1f} s "
              f"on {len(report.workers)} worker(s) ({', '.join(devices)}); rougeL {report.overall.get('rougeL', 0):.2f}",
              flush=True)

        start = time.perf_counter()
        summary = predict(PredictOptions(model=str(work / "export"), sources=[json.dumps(spec)],
                                         output=str(work / "predict"), batch_size=args.batch_size,
                                         max_new_tokens=args.max_new_tokens), log_run=False, progress=print)
        predict_seconds = time.perf_counter() - start
        print(f"hint predict: {summary['rows']} rows in {predict_seconds:.1f} s", flush=True)
        ray.shutdown()
    print(f"eval_examples_per_s={examples / eval_seconds:.2f} "
          f"predict_rows_per_s={summary['rows'] / predict_seconds:.2f} eval_device={devices[0]}")


if __name__ == "__main__":
    main()
