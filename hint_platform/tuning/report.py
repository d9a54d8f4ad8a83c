"""The report of a study: a leaderboard a person reads, and plots, logged to its parent run.

Read from Tune's results directory (so `hint tune report` works after the study, and on a
partial one): one row per trial with its point of the space, how it ended, its last value of the study's
metric, its held-out scores (ROUGE-L, exact match or accuracy of the evaluation every trial that
trains to the end gets, runner.py), the size of the PEFT modules it generates per task and its
inference GFLOPs per task.
Plots: learning curves, metric vs PEFT size, metric vs inference GFLOPs per task.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib
from ray.tune import ExperimentAnalysis

from hint_model import flops
from hint_platform.config import model_config
from hint_platform.errors import UserError
from hint_platform.tracking import runs
from hint_platform.tuning import study_runs
from hint_platform.tuning.plan import StudyRun, apply_point, point_label

matplotlib.use("Agg")  # files only: no display on a cluster or in CI
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)

# Inference cost of one task in the plots: the paper's SNI evaluation (Appendix C):
# 100 inputs of a task, instruction and input lengths as configured, 128 output tokens.
TASK_INPUTS = 100
OUTPUT_LEN = 128
# The held-out scores a finished trial reports (evaluation/metrics.py, x100), as columns.
SCORES = {"eval/rougeL": "ROUGE-L", "eval/exact_match": "exact match", "eval/accuracy": "accuracy"}


@dataclass
class Row:
    trial_id: str
    point: str  # the trial's point of the space, `key=value ...`
    status: str  # done | stopped early | failed | pending | running
    steps: int  # last step reported
    metric: float  # last reported value of the study's metric (nan: never reported)
    peft_params: int  # generated PEFT parameters per task
    gflops: float  # inference GFLOPs per task
    curve: tuple[list[int], list[float]]  # (steps, metric values)
    scores: dict[str, float]  # SCORES keys the trial reported -> their last value


def require_results(run: StudyRun) -> None:
    """A study that never ran is a one-line error (before any tracking store is touched)."""
    if not (run.path / "tuner.pkl").exists():
        raise UserError(f"no results for study {run.name} under {run.path}: "
                        f"run `hint tune {run.study.name}` first")


def leaderboard(run: StudyRun) -> list[Row]:
    """The study's trials, best first (trials without the metric last)."""
    require_results(run)
    analysis = ExperimentAnalysis(str(run.path))
    frames = analysis.trial_dataframes
    metric, max_steps = run.study.metric, run.base.train.max_steps
    rows = []
    for trial in analysis.trials:
        frame = frames.get(trial.trial_id)
        steps, values = [], []
        if frame is not None and metric in frame and "step" in frame:
            reported = frame[frame[metric].notna()]
            steps, values = reported["step"].astype(int).tolist(), reported[metric].tolist()
        scores = {}
        if frame is not None:
            for key in SCORES:
                reported = frame[key].dropna() if key in frame else []
                if len(reported):
                    scores[key] = float(reported.iloc[-1])
        last_step = int(trial.last_result.get("step", 0) or 0)
        cfg = apply_point(run.base, trial.config)
        rows.append(Row(
            trial_id=trial.trial_id, point=point_label(trial.config),
            status=study_runs.trial_outcome(trial, max_steps), steps=last_step,
            metric=values[-1] if values else math.nan,
            peft_params=peft_params(cfg), gflops=inference_gflops(cfg), curve=(steps, values),
            scores=scores))
    sign = 1 if run.study.mode == "min" else -1

    def rank(row: Row) -> tuple[int, float]:
        return (1, 0.0) if math.isnan(row.metric) else (0, sign * row.metric)

    return sorted(rows, key=rank)


def format_table(rows: list[Row], metric: str) -> str:
    scores = [k for k in SCORES if any(k in r.scores for r in rows)]
    header = ["#", "trial", "point", "status", "steps", metric, *(SCORES[k] for k in scores),
              "PEFT params/task", "GFLOPs/task"]
    body = [[str(i), r.trial_id, r.point, r.status, str(r.steps),
             "-" if math.isnan(r.metric) else f"{r.metric:.4f}",
             *(f"{r.scores[k]:.2f}" if k in r.scores else "-" for k in scores),
             f"{r.peft_params:,}", f"{r.gflops:,.1f}"] for i, r in enumerate(rows, 1)]
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)).rstrip()
             for line in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_report(run: StudyRun, parent_run_id: str | None) -> Path:
    """Writes report/ (leaderboard.txt + PNG plots) into the study directory, tags the best
    trial, and logs the report to the study's MLflow parent run. Returns the report directory."""
    rows = leaderboard(run)
    metric = run.study.metric
    out = run.path / "report"
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(rows, metric)
    better = "lower" if run.study.mode == "min" else "higher"
    note = "" if any(r.curve[0] for r in rows) else (
        f"\nno trial reported {metric}: is it among the training's metrics (for eval_loss: "
        "data.eval sources and train.eval_every)?\n")
    held_out = ("ROUGE-L, exact match, accuracy: x100, on data.eval after training (as `hint "
                "eval`), for each trial that trained to the end\n") if any(r.scores for r in rows) else ""
    (out / "leaderboard.txt").write_text(
        f"{run.name}: {run.study.question}\n{metric}: the last value each trial reported, "
        f"{better} is better\n{held_out}\n{table}\n{note}")
    plot_learning_curves(rows, metric, out / "learning_curves.png")
    plot_against(rows, "peft_params", "generated PEFT parameters per task", metric,
                 out / f"{metric}_vs_peft_size.png")
    plot_against(rows, "gflops", f"inference GFLOPs per task ({TASK_INPUTS} inputs)", metric,
                 out / f"{metric}_vs_gflops.png")
    if parent_run_id:
        best = rows[0] if rows and not math.isnan(rows[0].metric) else None
        study_runs.mark_best(run, parent_run_id, best and best.trial_id, metric,
                             best and best.metric)
        with runs.mlflow_client(run.tracking_uri) as client:
            client.log_artifacts(parent_run_id, str(out), "report")
    return out


def plot_learning_curves(rows: list[Row], metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if r.curve[0]:
            ax.plot(*r.curve, marker=".", label=f"{r.point} ({r.status})")
    ax.set(xlabel="step", ylabel=metric, title=f"{metric} during training")
    if any(r.curve[0] for r in rows):
        ax.legend(fontsize="small")
    _save(fig, path)


def plot_against(rows: list[Row], attr: str, xlabel: str, metric: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in rows:
        if not math.isnan(r.metric):
            ax.scatter(getattr(r, attr), r.metric)
            ax.annotate(r.point, (getattr(r, attr), r.metric), fontsize="x-small")
    ax.set(xlabel=xlabel, ylabel=metric, title=f"{metric} vs {xlabel}")
    _save(fig, path)


def peft_params(cfg) -> int:
    """Parameters the hypernetwork generates for one task (adapters, prefixes, LoRA)."""
    m = model_config(cfg)
    return flops.task_state_values(m, t=0) if m.hypernetwork else 0


def inference_gflops(cfg) -> float:
    """Inference GFLOPs of one task of TASK_INPUTS inputs at the configured lengths
    (hint_model.flops.gflops_per_task, Appendix C)."""
    d = cfg.data
    return flops.gflops_per_task(model_config(cfg), TASK_INPUTS, i=d.max_input_len,
                                 t=d.max_hyper_len, target_len=OUTPUT_LEN)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
