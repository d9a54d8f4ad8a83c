"""`hint demo`: the whole platform end to end on a laptop, offline, in about ten minutes.

1. Write the synthetic instruction suite (pipelines.synthetic) and train its tokenizer.
2. For HINT and the two baselines (No-Instruct: input only; concatenation, Tk-Instruct style:
   instruction + input in the model input), the same two stages on local Ray (2 workers, FSDP
   on CPU): pretrain on the suite's prose (the shipped config demo/pretrain), fine-tune on the
   train tasks (demo/finetune).
3. Evaluate each zero-shot on the HELD-OUT tasks, print ROUGE-L, exact match and inference
   GFLOPs per task, register the HINT model, and say how to open the MLflow UI.

Everything lands under one run directory (default runs/demo): data, tokenizer, Ray Train
runs, exports, evaluations and the MLflow SQLite store. The last line of output is the figures.
"""

from __future__ import annotations

import glob
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from hint_platform import config
from hint_platform.evaluation import evaluate
from hint_platform.evaluation.metrics import EvalReport
from hint_platform.tracking import registry, runs
from hint_platform.training.driver import TrainResult, fit
from pipelines import synthetic, train_tokenizer

# variant -> the SNI format its data is written in
VARIANTS = {"hint": "def", "no_instruct": "no_instruct", "concat": "concat"}


@dataclass
class DemoSettings:
    """The synthetic suite's size and the steps; `quick()` is the smoke-test version."""

    num_train_tasks: int = 180
    num_test_tasks: int = 24
    instances_per_task: int = 20
    num_pretrain_docs: int = 400
    vocab_size: int = 600
    eval_per_task: int = 20
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> "DemoSettings":
        return cls(num_train_tasks=20, num_test_tasks=4, instances_per_task=20, num_pretrain_docs=40,
                   vocab_size=300, eval_per_task=4, pretrain_overrides=("train.max_steps=2",),
                   finetune_overrides=("train.max_steps=2",))


class Progress:
    """Timestamped progress lines (minutes since the start)."""

    def __init__(self):
        self.start = time.monotonic()

    @property
    def minutes(self) -> float:
        return (time.monotonic() - self.start) / 60

    def __call__(self, message: str) -> None:
        print(f"[{self.minutes:5.2f} min] {message}", flush=True)


@dataclass
class Trained:
    """One variant after fine-tuning and zero-shot evaluation."""

    cfg: config.ExperimentConfig  # the fine-tuning config (its data.eval: the held-out tasks)
    export_dir: str
    mlflow_run_id: str | None
    tracking_uri: str
    report: EvalReport


def run_demo(out_dir: str | Path = "runs/demo", settings: DemoSettings | None = None) -> dict[str, float]:
    """Runs the demo in a fresh `out_dir`; returns the figures of its last line."""
    settings = settings or DemoSettings()
    out = Path(out_dir).resolve()
    progress = Progress()
    if out.exists():
        shutil.rmtree(out)  # a demo is a fresh run; Ray Train would otherwise resume old runs
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")

    progress(f"writing the synthetic suite under {out / 'data'}")
    suite = synthetic.write_suite(out / "data", num_train_tasks=settings.num_train_tasks,
                                  num_test_tasks=settings.num_test_tasks,
                                  instances_per_task=settings.instances_per_task,
                                  num_pretrain_docs=settings.num_pretrain_docs)
    tokenizer = train_tokenizer(suite.texts(), out / "tokenizer", vocab_size=settings.vocab_size)
    progress(f"{len(suite.train_tasks)} train tasks, {len(suite.test_tasks)} held-out tasks; "
             f"tokenizer of {tokenizer.vocab_size} pieces")
    if not ray.is_initialized():
        # More logical CPUs than cores: the two workers take half a CPU each, Ray Data the rest.
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, _temp_dir=str(out / "ray"))

    trained = {variant: train_and_evaluate(variant, suite, out, settings, progress) for variant in VARIANTS}

    hint = trained["hint"]
    uri = hint.tracking_uri
    name = hint.cfg.run.register_as
    progress(f"registering the HINT model as {name}")
    logged = registry.log_and_register(hint.export_dir, tracking_uri=uri, run_id=hint.mlflow_run_id, name=name)
    registry.set_alias(uri, name, "champion", logged["version"])

    print(f"\n{'held-out tasks':<16}{'ROUGE-L':>10}{'exact match':>14}{'GFLOPs/task':>14}")
    for variant, run in trained.items():
        o = run.report.overall
        print(f"{variant:<16}{o['rougeL']:>10.2f}{o['exact_match']:>14.2f}{o['gflops_per_task']:>14.4f}")
    print(f"\nregistered {logged['model_uri']} (alias: models:/{name}@champion)")
    print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   "
          "(listens on this machine only; then open http://127.0.0.1:5000)")
    print(f"try it:    hint registry load models:/{name}@champion --tracking-uri {uri} "
          f"--instruction 'Is owl in the list?' --input 'fox owl 3'")
    rouge = {v: run.report.overall["rougeL"] for v, run in trained.items()}
    figures = {
        "demo_minutes": progress.minutes, "hint_rougeL": rouge["hint"],
        "no_instruct_rougeL": rouge["no_instruct"], "concat_rougeL": rouge["concat"],
        "hint_minus_no_instruct_rougeL": rouge["hint"] - rouge["no_instruct"],
        "hint_minus_concat_rougeL": rouge["hint"] - rouge["concat"],
        "hint_gflops_per_task": trained["hint"].report.overall["gflops_per_task"],
        "concat_gflops_per_task": trained["concat"].report.overall["gflops_per_task"],
    }
    print(" ".join(f"{k}={v:.4g}" if "gflops" in k else f"{k}={v:.2f}" for k, v in figures.items()))
    return figures


def train_and_evaluate(variant: str, suite, out: Path, settings: DemoSettings, progress: Progress) -> Trained:
    """Pretrain and fine-tune one variant on the suite, then evaluate it on the held-out tasks."""
    (pretrain_file,) = glob.glob(suite.c4_path)  # one file; train.fit checks that paths exist
    common = [f"run.storage_path={out}", f"data.tokenizer={out / 'tokenizer'}"]
    pre = config.load("demo/pretrain", [*common, *settings.pretrain_overrides])
    pre = pre.with_overrides({"name": f"demo-pretrain-{variant}", "model.variant": variant,
                              "data.train": [{**pre.data.train[0], "path": pretrain_file}]})
    progress(f"{variant}: pretraining ({pre.train.max_steps} steps, {pre.train.num_workers} workers)")
    pretrained = _fit(pre)

    cfg = config.load("demo/finetune", [*common, *settings.finetune_overrides])
    sni = {"path": suite.sni_path, "format": VARIANTS[variant]}
    cfg = cfg.with_overrides({
        "name": f"demo-finetune-{variant}", "model.variant": variant,
        "model.init_from": pretrained.export_dir,
        "data.train": [{**cfg.data.train[0], **sni}],
        "data.eval": [{**cfg.data.eval[0], **sni, "max_per_task": settings.eval_per_task}],
    })
    progress(f"{variant}: fine-tuning on the train tasks ({cfg.train.max_steps} steps)")
    result = _fit(cfg)

    progress(f"{variant}: evaluating zero-shot on the held-out tasks")
    report = evaluate.evaluate_export(result.export_dir, cfg, batch_size=64,
                                     max_new_tokens=cfg.data.max_target_len)
    eval_dir = out / "eval" / variant
    evaluate.save_report(report, eval_dir)
    uri = result.tracking_uri
    evaluate.log_report(report, eval_dir, tracking_uri=uri, experiment=cfg.run.experiment,
                        run_name=f"eval-{variant}", artifact_location=runs.artifact_location(cfg, uri))
    progress(f"{variant}: ROUGE-L {report.overall['rougeL']:.1f}, exact match {report.overall['exact_match']:.1f}")
    return Trained(cfg, result.export_dir, result.mlflow_run_id, result.tracking_uri, report)


def _fit(cfg: config.ExperimentConfig) -> TrainResult:
    result = fit(cfg)
    if not result.export_dir:
        raise RuntimeError(f"{cfg.name}: training finished without an export")
    return result
