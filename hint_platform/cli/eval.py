"""`hint eval MODEL CONFIG`: ROUGE-L / exact match (SNI) or rank accuracy (P3) of a model on the
evaluation sources of an experiment config, per task, per category and overall."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hint_platform.redact import redact_text


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="evaluate an export or a registered model on a config's eval sources",
        description="Evaluate MODEL on the data.eval sources of CONFIG. The model runs in Ray "
                    "workers (one per GPU of the cluster of $RAY_ADDRESS, else of a local Ray), the "
                    "tasks spread over them; modules are generated once per task. Predictions (jsonl) and metrics are saved under --out and logged "
                    "to MLflow as artifacts of an evaluation run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export directory, or models:/NAME@ALIAS (models:/NAME/VERSION)")
    p.add_argument("config", help="experiment config YAML whose data.eval lists the sources")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--out", help="output directory (default: <run.storage_path>/eval/<config name>)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest output (default: the config's data.max_target_len; the paper's is 256)")
    p.add_argument("--workers", type=int, default=None,
                   help="Ray workers, one model each (default: one per GPU of the cluster, one without GPUs)")
    p.add_argument("--gpus-per-worker", type=float, default=None,
                   help="GPUs each worker asks for on a GPU cluster (default 1; 0.5: two models share a GPU)")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPUs each worker asks for without GPUs")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--no-mlflow", action="store_true", help="save files only, log nothing to MLflow")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from hint_platform import config
    from hint_platform.evaluation import evaluate
    from hint_platform.evaluation.workers import EvalWorkers
    from hint_platform.tracking import registry, runs
    from hint_platform.training.driver import start_ray

    cfg = config.load(args.config, args.overrides)
    uri = None if args.no_mlflow else runs.resolve_tracking_uri(cfg)
    if uri:
        runs.check_reachable(uri)
    export = registry.resolve_export(args.model, uri)
    if not ray.is_initialized():
        start_ray()  # RAY_ADDRESS's cluster, else a local Ray: the model runs in its workers
    workers = EvalWorkers(count=args.workers, gpus=args.gpus_per_worker, cpus=args.cpus_per_worker,
                          dtype=args.dtype)
    report = evaluate.evaluate_export(export, cfg, batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens, workers=workers,
                                      progress=lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(args.out) if args.out else runs.storage_dir(cfg) / "eval" / cfg.name
    evaluate.save_report(report, out)
    print(format_report(report))
    print(f"predictions and metrics: {out}")
    if uri:
        run_id = evaluate.log_report(report, out, tracking_uri=uri, experiment=cfg.run.experiment,
                                     run_name=f"eval-{cfg.name}",
                                     artifact_location=runs.artifact_location(cfg, uri))
        print(f"MLflow run {run_id} at {redact_text(uri)}")
    return 0


def format_report(report) -> str:
    """A plain-text table: per category (when known), then overall."""
    names = sorted({k for m in report.per_task.values() for k in m})
    lines = [f"{'':<40}" + "".join(f"{n:>14}" for n in names)]
    for title, table in (("category", report.per_category), ("task", {} if report.per_category else report.per_task)):
        for key, metrics in sorted(table.items()):
            lines.append(f"{title + ' ' + key:<40.40}" + "".join(f"{metrics.get(n, float('nan')):>14.2f}" for n in names))
    lines.append(f"{'overall':<40}" + "".join(f"{report.overall.get(n, float('nan')):>14.2f}" for n in names))
    return "\n".join(lines)
