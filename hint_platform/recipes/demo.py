"""`hint demo`: the whole platform end to end on a laptop, offline, in under ten minutes on 2
cores (README says where the time goes).

1. Write the synthetic instruction suite (pipelines.synthetic) and train its tokenizer.
2. Pretrain two T5s on the suite's prose on local Ray (2 workers, FSDP on CPU; one Ray for
   every stage): HINT, and the plain T5 both T5 baselines start from (demo/pretrain).
3. Fine-tune them on the train tasks (demo/finetune): T5 HINT, No-Instruct (input only) and
   concatenation (Tk-Instruct style: instruction + input in the model input). The decoder rows:
   a small Llama-style base trained from scratch as a causal LM on the train tasks with the
   instruction in the prompt (demo/decoder_base), which is the prompt baseline (the
   instruction's keys / values cached once per task as each input's prefix); HINT-decoder and
   the decoder No-Instruct fine-tuned from it (demo/decoder_finetune). Each is evaluated
   zero-shot on the HELD-OUT tasks, and so is the Text-to-LoRA control: the same HINT-decoder
   given a random OTHER held-out task's instruction.
4. Print ROUGE-L, exact match, inference GFLOPs per task of 100 inputs and the state a task
   keeps between inputs, register the T5 HINT model, and say how to open the MLflow UI.

Everything lands under one run directory (default runs/demo): data, tokenizer, Ray Train
runs, exports, evaluations and the MLflow SQLite store. The last line of output is the figures.
"""

from __future__ import annotations

import glob
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import ray

from hint_model.flops import gflops_per_task, task_cost
from hint_platform import config, export
from hint_platform.evaluation import evaluate
from hint_platform.evaluation.metrics import EvalReport
from hint_platform.tracking import registry, runs
from hint_platform.training.driver import TrainResult, fit
from pipelines import synthetic, train_tokenizer

# The T5 pretraining runs on the suite's prose: name -> model.variant. The T5 baselines have the
# same model (no hypernetwork, no PEFT) and read the same pretraining stream: one run serves both.
PRETRAINING = {"hint": "hint", "t5": "concat"}
GFLOPS_INPUTS = 100  # inputs per task of the GFLOPs column


@dataclass(frozen=True)
class Row:
    """One model of the table: trained on the train tasks, evaluated on the held-out tasks."""

    name: str
    variant: str  # model.variant
    format: str  # the SNI format its data is written in
    start: str | None  # what it starts from: a PRETRAINING run, an earlier row, or None (scratch)
    config: str  # its training config


# The decoder rows: the prompt baseline is the decoder base, trained from scratch on the train
# tasks (demo/decoder_base); HINT-decoder and No-Instruct are fine-tuned from it.
# HINT-decoder is the `frozen_underlying` variant: the `hint` modules (generated LoRA on q and
# v, adapters, prefixes) and fusion (each input attends to the instruction's keys / values from
# the hypernetwork's own pass), the hypernetwork trained on the frozen base as Text-to-LoRA
# trains it. It reads the base's own text, the instruction part to the hypernetwork ('concat'
# format; demo/decoder_finetune says what the alternatives scored).
# `lora_only` would have to write a held-out item, which no training instruction names, into
# generated weights; with fusion the input looks the item up in the instruction, as the T5 does.
ROWS = (
    Row("hint", "hint", "def", "hint", "demo/finetune"),
    Row("no_instruct", "no_instruct", "no_instruct", "t5", "demo/finetune"),
    Row("concat", "concat", "concat", "t5", "demo/finetune"),
    Row("decoder_prompt", "concat", "concat", None, "demo/decoder_base"),
    Row("decoder_hint", "frozen_underlying", "concat", "decoder_prompt", "demo/decoder_finetune"),
    Row("decoder_no_instruct", "no_instruct", "no_instruct", "decoder_prompt", "demo/decoder_finetune"),
)
# The Text-to-LoRA control: decoder_hint's model, each held-out task given another's instruction.
RANDOM_INSTRUCTION = "decoder_hint_random_instruction"


@dataclass
class DemoSettings:
    """The synthetic suite's size and the steps; `quick()` is the smoke-test version."""

    num_train_tasks: int = 180
    num_test_tasks: int = 24
    instances_per_task: int = 20
    num_pretrain_docs: int = 400
    vocab_size: int = 600
    eval_per_task: int = 20
    seed: int = 0  # the control's draw of other instructions
    pretrain_overrides: tuple[str, ...] = ()
    finetune_overrides: tuple[str, ...] = ()

    @classmethod
    def quick(cls) -> "DemoSettings":
        # One worker a stage: the quick version checks the chain of stages, not the sharding
        # (tests/test_train.py checks FSDP over two workers); a second worker costs each stage
        # one more process importing torch.
        short = ("train.max_steps=2", "train.num_workers=1")
        return cls(num_train_tasks=20, num_test_tasks=4, instances_per_task=20, num_pretrain_docs=40,
                   vocab_size=300, eval_per_task=4, pretrain_overrides=short, finetune_overrides=short)


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
    """One row after fine-tuning and zero-shot evaluation."""

    cfg: config.ExperimentConfig  # the fine-tuning config (its data.eval: the held-out tasks)
    export_dir: str
    mlflow_run_id: str | None
    tracking_uri: str
    report: EvalReport
    gflops_per_task: float  # at GFLOPS_INPUTS inputs per task
    task_state_kib: float  # what a task keeps between its inputs (bf16)


def run_demo(out_dir: str | Path = "runs/demo", settings: DemoSettings | None = None,
             rows: tuple[Row, ...] = ROWS) -> dict[str, float]:
    """Runs the demo in a fresh `out_dir`; returns the figures of its last line. `rows`: a
    subset of ROWS to train (the figures of the rows left out are not reported)."""
    settings = settings or DemoSettings()
    out = Path(out_dir).resolve()
    progress = Progress()
    if out.exists():
        shutil.rmtree(out)  # a demo is a fresh run; Ray Train would otherwise resume old runs
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # One local node: nothing to be preempted, and the watcher is one more process (Ray Train
    # imports in it for seconds) at every stage's start.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")

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

    exports = {name: pretrain(name, suite, out, settings, progress).export_dir
               for name in dict.fromkeys(row.start for row in rows) if name in PRETRAINING}
    trained: dict[str, Trained] = {}
    for row in rows:
        if row.start is not None and row.start not in exports:
            raise ValueError(f"demo row {row.name} starts from {row.start}, which is not among the rows before it")
        trained[row.name] = train_and_evaluate(row, exports.get(row.start), suite, out, settings, progress)
        exports[row.name] = trained[row.name].export_dir
    if "decoder_hint" in trained:
        trained[RANDOM_INSTRUCTION] = evaluate_random_instructions(trained["decoder_hint"], out, settings, progress)

    print_table(trained)
    if "hint" in trained:
        register(trained["hint"], progress)
    figures = demo_figures(trained, progress.minutes)
    print(" ".join(f"{k}={v:.4g}" if "gflops" in k else f"{k}={v:.2f}" for k, v in figures.items()))
    return figures


def pretrain(name: str, suite, out: Path, settings: DemoSettings, progress: Progress) -> TrainResult:
    """PRETRAINING[name]: a T5 on the suite's prose (demo/pretrain)."""
    (pretrain_file,) = glob.glob(suite.c4_path)  # one file; train.fit checks that paths exist
    variant = PRETRAINING[name]
    cfg = config.load("demo/pretrain", [*_common(out), *settings.pretrain_overrides])
    cfg = cfg.with_overrides({"name": f"demo-pretrain-{name}", "model.variant": variant,
                              "data.train": [{**cfg.data.train[0], "path": pretrain_file}]})
    progress(f"pretraining T5 {name} ({variant}) on the suite's prose ({cfg.train.max_steps} steps, "
             f"{cfg.train.num_workers} workers)")
    return _fit(cfg)


def train_and_evaluate(row: Row, init_from: str | None, suite, out: Path, settings: DemoSettings,
                       progress: Progress) -> Trained:
    """Train one row on the train tasks (from the export `init_from`, or from scratch), then
    evaluate it on the held-out tasks."""
    cfg = config.load(row.config, [*_common(out), *settings.finetune_overrides])
    sni = {"path": suite.sni_path, "format": row.format}
    cfg = cfg.with_overrides({
        "name": f"demo-finetune-{row.name}", "model.variant": row.variant,
        "model.init_from": init_from,
        "data.train": [{**cfg.data.train[0], **sni}],
        "data.eval": [{**cfg.data.eval[0], **sni, "max_per_task": settings.eval_per_task}],
    })
    start = f"from {Path(init_from).parent.name}" if init_from else "from scratch"
    progress(f"{row.name} ({cfg.model.preset} as {row.variant}): training on the train tasks {start} "
             f"({cfg.train.max_steps} steps)")
    result = _fit(cfg)
    records = evaluate.eval_records(result.export_dir, cfg)
    return evaluate_row(row.name, cfg, result.export_dir, result.mlflow_run_id, result.tracking_uri,
                        records, out, progress)


def evaluate_random_instructions(hint: Trained, out: Path, settings: DemoSettings, progress: Progress) -> Trained:
    """The Text-to-LoRA control: the HINT-decoder model, each held-out task's inputs given the
    instruction of another held-out task drawn at random (seeded); the references stay."""
    records = other_instructions(evaluate.eval_records(hint.export_dir, hint.cfg), settings.seed)
    return evaluate_row(RANDOM_INSTRUCTION, hint.cfg, hint.export_dir, hint.mlflow_run_id,
                        hint.tracking_uri, records, out, progress)


def other_instructions(records: list[dict], seed: int) -> list[dict]:
    """`records` with each task's instruction replaced by another task's, drawn with `seed`."""
    instructions = {r["task"]: r["hyper_input_ids"] for r in records}
    if len(instructions) < 2:
        raise ValueError("other_instructions: needs at least two tasks")
    rng = random.Random(seed)
    drawn = {task: instructions[rng.choice([other for other in instructions if other != task])]
             for task in instructions}
    return [{**r, "hyper_input_ids": drawn[r["task"]]} for r in records]


def evaluate_row(name: str, cfg: config.ExperimentConfig, export_dir: str, mlflow_run_id: str | None,
                 uri: str, records: list[dict], out: Path, progress: Progress) -> Trained:
    """The export on `records` (the held-out tasks), saved under out/eval/<name> and logged."""
    progress(f"{name}: evaluating zero-shot on the held-out tasks")
    report = evaluate.evaluate_export(export_dir, cfg, batch_size=64, records=records,
                                      max_new_tokens=cfg.data.max_target_len)
    eval_dir = out / "eval" / name
    evaluate.save_report(report, eval_dir)
    evaluate.log_report(report, eval_dir, tracking_uri=uri, experiment=cfg.run.experiment,
                        run_name=f"eval-{name}", artifact_location=runs.artifact_location(cfg, uri))
    progress(f"{name}: ROUGE-L {report.overall['rougeL']:.1f}, exact match {report.overall['exact_match']:.1f}")
    gflops, state = task_figures(export.model_config(export_dir), records)
    return Trained(cfg, export_dir, mlflow_run_id, uri, report, gflops, state)


def task_figures(model_config, records: list[dict]) -> tuple[float, float]:
    """(inference GFLOPs of a task of GFLOPS_INPUTS inputs, the task state in KiB) at the
    evaluated tasks' mean lengths (hint_model.flops). The task state: HINT's generated modules
    (and, with fusion, the instruction's keys / values), a decoder prompt model's cache of the
    instruction, nothing for a model that re-reads it or reads none."""
    lengths = evaluate.task_lengths(records)
    gflops = [gflops_per_task(model_config, GFLOPS_INPUTS, i=i, t=t, target_len=o) for _, t, i, o in lengths]
    state = [task_cost(model_config, GFLOPS_INPUTS, t, i, o).hint_state_bytes for _, t, i, o in lengths]
    return sum(gflops) / len(gflops), sum(state) / len(state) / 2**10


def print_table(trained: dict[str, Trained]) -> None:
    print(f"\n{'held-out tasks':<34}{'ROUGE-L':>9}{'exact match':>13}"
          f"{f'GFLOPs/task (n={GFLOPS_INPUTS})':>22}{'task state KiB':>16}")
    for name, row in trained.items():
        o = row.report.overall
        print(f"{name:<34}{o['rougeL']:>9.2f}{o['exact_match']:>13.2f}"
              f"{row.gflops_per_task:>22.4f}{row.task_state_kib:>16.1f}")


def register(hint: Trained, progress: Progress) -> None:
    """The T5 HINT model into the MLflow registry, alias `champion`; how to look at it."""
    uri, name = hint.tracking_uri, hint.cfg.run.register_as
    progress(f"registering the HINT model as {name}")
    logged = registry.log_and_register(hint.export_dir, tracking_uri=uri, run_id=hint.mlflow_run_id, name=name)
    registry.set_alias(uri, name, "champion", logged["version"])
    print(f"\nregistered {logged['model_uri']} (alias: models:/{name}@champion)")
    print(f"MLflow UI: mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000   "
          "(listens on this machine only; then open http://127.0.0.1:5000)")
    print(f"try it:    hint registry load models:/{name}@champion --tracking-uri {uri} "
          f"--instruction 'Is owl in the list?' --input 'fox owl 3'")


def demo_figures(trained: dict[str, Trained], minutes: float) -> dict[str, float]:
    """The last line: the T5 rows' figures, then the decoder rows' (those that ran)."""
    rouge = {name: row.report.overall["rougeL"] for name, row in trained.items()}
    figures = {"demo_minutes": minutes}
    if {"hint", "no_instruct", "concat"} <= rouge.keys():
        figures.update({
            "hint_rougeL": rouge["hint"], "no_instruct_rougeL": rouge["no_instruct"],
            "concat_rougeL": rouge["concat"],
            "hint_minus_no_instruct_rougeL": rouge["hint"] - rouge["no_instruct"],
            "hint_minus_concat_rougeL": rouge["hint"] - rouge["concat"],
            "hint_gflops_per_task": trained["hint"].gflops_per_task,
            "concat_gflops_per_task": trained["concat"].gflops_per_task,
        })
    if {"decoder_hint", "decoder_prompt", "decoder_no_instruct", RANDOM_INSTRUCTION} <= rouge.keys():
        hint = rouge["decoder_hint"]
        figures.update({
            "decoder_hint_rougeL": hint, "decoder_prompt_rougeL": rouge["decoder_prompt"],
            "decoder_no_instruct_rougeL": rouge["decoder_no_instruct"],
            "decoder_hint_minus_no_instruct_rougeL": hint - rouge["decoder_no_instruct"],
            "decoder_hint_minus_prompt_rougeL": hint - rouge["decoder_prompt"],
            "decoder_random_instruction_drop_rougeL": hint - rouge[RANDOM_INSTRUCTION],
        })
    return figures


def _common(out: Path) -> list[str]:
    return [f"run.storage_path={out}", f"data.tokenizer={out / 'tokenizer'}"]


def _fit(cfg: config.ExperimentConfig) -> TrainResult:
    result = fit(cfg)
    if not result.export_dir:
        raise RuntimeError(f"{cfg.name}: training finished without an export")
    return result
