"""`hint paper list|run|table`: the paper's tables as runnable plans (hint_platform/paper/)."""

from __future__ import annotations

import argparse
import os


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "paper", help="the paper's tables: list their runs, run their chains, assemble them",
        description="Every table of the paper (HINT, ACL 2023) as a chain of stages: pretraining, "
                    "fine-tuning from its export, evaluation. `run` resumes what finished; `table` "
                    "assembles the table from MLflow.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    listing = sub.add_parser("list", help="the experiments and the runs each needs, at 3B and 11B")
    listing.add_argument("table", nargs="?", help="one table (default: all)")
    listing.set_defaults(func=run_list)

    for action, helptext, func in (
            ("run", "run a table's chain of stages (skips what finished, resumes the rest)", run_run),
            ("table", "assemble a table from MLflow as Markdown and CSV (logged to MLflow)", run_table)):
        a = sub.add_parser(
            action, help=helptext, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
            description=helptext + ". Overrides: `key=value` for every stage, `SETUP:key=value` "
                        "for the stages on config paper/hint-<size>-SETUP (e.g. sni-def:data.train=...).")
        a.add_argument("table", help="table1, table2, table3, table4, peft, table6, generator, table7, flops")
        a.add_argument("overrides", nargs="*", metavar="[SETUP:]KEY=VALUE", help="config overrides")
        a.add_argument("--size", choices=("xl", "xxl"), default="xl", help="3B (xl) or 11B (xxl)")
        a.add_argument("--checkpoint", help="the LM-adapted T5 checkpoint chains start from "
                                            "(default: the one the pretraining config names)")
        a.add_argument("--row", action="append", default=[], metavar="LABEL",
                       help="only this row (repeatable; `hint paper list` names them)")
        a.set_defaults(func=func)
        if action == "run":
            a.add_argument("--address", help="run the chain as a Ray job on this cluster "
                                             "(http://HEAD:8265) instead of here")
            a.add_argument("--shared-dir", help="storage every node reaches: the configs' relative "
                                                "paths go under it")
            a.add_argument("--tracking-uri", help="MLflow URI the job logs to, as the cluster "
                                                  "reaches it (default: $MLFLOW_TRACKING_URI)")
            a.add_argument("--no-wait", action="store_true", help="submit and return")
            a.add_argument("--eval-workers", type=int, help="Ray workers of each evaluation, one model "
                                                            "each (default: one per GPU of the cluster)")
            a.add_argument("--eval-gpus", type=float, help="GPUs per evaluation worker (default 1)")


def _table(key: str, rows: list[str] = ()):
    """The table `key`, restricted to `rows` when given."""
    from hint_platform.errors import UserError
    from hint_platform.paper import plan

    try:
        return plan.table(key).only(list(rows))
    except KeyError as e:
        raise UserError(e.args[0]) from None


def run_list(args: argparse.Namespace) -> int:
    from hint_platform.paper import plan

    tables = [_table(args.table)] if args.table else list(plan.TABLES.values())
    for t in tables:
        print(f"{t.key}: {t.title}")
        for size in t.sizes:
            stages = t.stages()
            evaluated = {s.name for s in t.evaluated()}
            kind = {"runs": "evaluated", "lengths": "measured"}.get(t.kind)
            print(f"  {size} ({plan.SIZES[size]}): {len(stages)} run(s)" if stages else f"  {size}")
            for s in stages:
                start = s.start.run_name(size) if s.start else "LM-adapted T5"
                mark = f"  [{kind}]" if kind and s.name in evaluated else ""
                print(f"    {s.run_name(size):<40} {s.config_name(size)} {s.variant}, from {start}{mark}")
        print()
    return 0


def run_run(args: argparse.Namespace) -> int:
    from hint_platform.evaluation.workers import EvalWorkers
    from hint_platform.paper import runner

    table = _table(args.table, args.row)
    workers = EvalWorkers(count=args.eval_workers, gpus=args.eval_gpus)
    if args.address:
        request = runner.paper_job(table, args.size, args.overrides, shared_dir=args.shared_dir,
                                   checkpoint=args.checkpoint, workers=workers,
                                   tracking_uri=args.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI"))
        return runner.submit_table(request, args.address, wait=not args.no_wait)
    outcomes = runner.run_local(table, args.size, args.overrides, checkpoint=args.checkpoint,
                                shared_dir=args.shared_dir, workers=workers,
                                progress=lambda line: print(line, flush=True))
    done = {}
    for o in outcomes:
        done[o.action] = done.get(o.action, 0) + 1
    print(f"{table.key} ({args.size}): " + ", ".join(f"{n} {a}" for a, n in done.items()))
    return 0


def run_table(args: argparse.Namespace) -> int:
    from hint_platform.paper import tables

    assembled = tables.assemble(_table(args.table, args.row), args.size, args.overrides, args.checkpoint)
    print(assembled.markdown())
    out, run_id = tables.save_and_log(assembled, args.overrides, args.checkpoint)
    print(f"Markdown and CSV: {out}; MLflow run {run_id}")
    tables.require_complete(assembled)
    return 0
