"""`hint registry list|alias|load`: registered model versions, their aliases, and inference."""

from __future__ import annotations

import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("registry", help="list, alias and load registered models",
                              description="The MLflow model registry of hint models.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    ls = sub.add_parser("list", help="registered versions and their aliases",
                        description="List registered model versions (newest first) with aliases.")
    ls.add_argument("name", nargs="?", help="one registered model (default: all)")
    ls.set_defaults(func=list_cmd)

    alias = sub.add_parser("alias", help="point an alias (e.g. champion) at a version",
                           description="Point an alias of a registered model at one of its versions.")
    alias.add_argument("name")
    alias.add_argument("alias", help="e.g. champion")
    alias.add_argument("version", type=int)
    alias.set_defaults(func=alias_cmd)

    load = sub.add_parser("load", help="load a model and predict",
                          description="Load models:/NAME@ALIAS (or an export directory) and run it on "
                                      "inputs under one instruction; one output per line.")
    load.add_argument("model", help="models:/NAME@ALIAS, models:/NAME/VERSION or an export directory")
    load.add_argument("--instruction", required=True, help="the task instruction")
    load.add_argument("--input", action="append", dest="inputs", metavar="TEXT",
                      help="an input (repeatable); default: one input a line from stdin")
    load.add_argument("--max-new-tokens", type=int, default=None,
                      help="longest output (default: the model's target length)")
    load.set_defaults(func=load_cmd)

    for parser in (ls, alias, load):
        parser.add_argument("--tracking-uri",
                            help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")


def _uri(args) -> str:
    from hint_platform.config import ExperimentConfig
    from hint_platform.tracking.runs import check_reachable, resolve_tracking_uri

    uri = args.tracking_uri or resolve_tracking_uri(ExperimentConfig())
    check_reachable(uri)
    return uri


def list_cmd(args) -> int:
    from hint_platform.tracking.registry import list_versions

    rows = list_versions(_uri(args), args.name)
    print(f"{'name':<24} {'version':>7}  {'aliases':<20} run_id")
    for r in rows:
        print(f"{r['name']:<24} {r['version']:>7}  {','.join(r['aliases']) or '-':<20} {r['run_id']}")
    return 0


def alias_cmd(args) -> int:
    from hint_platform.tracking.registry import set_alias

    set_alias(_uri(args), args.name, args.alias, args.version)
    print(f"models:/{args.name}@{args.alias} -> version {args.version}")
    return 0


def load_cmd(args) -> int:
    from hint_platform.serving.predictor import CachedPredictor
    from hint_platform.tracking.registry import resolve_export

    uri = _uri(args) if args.model.startswith("models:/") else None
    inputs = args.inputs or [line.rstrip("\n") for line in sys.stdin if line.strip()]
    predictor = CachedPredictor(resolve_export(args.model, uri), max_new_tokens=args.max_new_tokens)
    for text, out in zip(inputs, predictor.predict([args.instruction] * len(inputs), inputs)):
        print(json.dumps({"input": text, "output": out}))
    return 0
