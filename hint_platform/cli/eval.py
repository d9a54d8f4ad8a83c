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
        description="Evaluate MODEL on the data.eval sources of CONFIG. Modules are generated once "
                    "per task. Predictions (jsonl) and metrics are saved under --out and logged "
                    "to MLflow as artifacts of an evaluation run.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export directory, or models:/NAME@ALIAS (models:/NAME/VERSION)")
    p.add_argument("config", help="experiment config YAML whose data.eval lists the sources")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    p.add_argument("--out", help="output directory (default: <run.storage_path>/eval/<config name>)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest output (default: the config's data.max_target_len; the paper's is 256)")
    p.add_argument("--no-mlflow", action="store_true", help="save files only, log nothing to MLflow")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from hint_platform import config
    from hint_platform.evaluation import evaluate
    from hint_platform.tracking import registry, runs

    cfg = config.load(args.config, args.overrides)
    uri = None if args.no_mlflow else runs.resolve_tracking_uri(cfg)
    if uri:
        runs.check_reachable(uri)
    export = registry.resolve_export(args.model, uri)
    report = evaluate.evaluate_export(export, cfg, batch_size=args.batch_size,
                                      max_new_tokens=args.max_new_tokens,
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
