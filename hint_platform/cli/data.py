"""`hint data prepare CONFIG` and `hint data stats PATH`: tokenise a config's sources once into
Parquet shards plus a manifest (pipelines.prepare), and print a prepared directory's manifest."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare and inspect training data",
                              description="Tokenise a config's data sources, and inspect prepared data.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    prep = sub.add_parser(
        "prepare", help="tokenise a config's sources into Parquet shards + manifest.json",
        description="Run the train (or eval) sources of CONFIG through the data pipeline and write "
                    "the rows (token ids, task, example_index, references...) as Parquet shards, with "
                    "a manifest: counts per task, token length statistics, the paper's Table 7 "
                    "medians and the bad records skipped.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prep.add_argument("config", help="experiment config YAML")
    prep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    prep.add_argument("--part", choices=("train", "eval"), default="train", help="which sources")
    prep.add_argument("--out", help="output directory (default: <run.storage_path>/data/<name>-<part>)")
    prep.set_defaults(func=prepare_cmd)

    stats = sub.add_parser("stats", help="examples, tasks and token lengths of prepared data",
                           description="Print the manifest of a directory written by `hint data prepare`.")
    stats.add_argument("path", help="a directory written by `hint data prepare` (or its manifest.json)")
    stats.set_defaults(func=stats_cmd)


def prepare_cmd(args: argparse.Namespace) -> int:
    from hint_platform import config
    from hint_platform.tracking import runs
    from hint_platform.errors import UserError
    from pipelines import SourceSpec, prepare, stats_table

    cfg = config.load(args.config, args.overrides)
    sources = cfg.data.train if args.part == "train" else cfg.data.eval
    if not sources:
        raise UserError(f"{args.config}: data.{args.part} lists no sources")
    specs = [SourceSpec.from_dict(s, where=f"data.{args.part}[{i}]") for i, s in enumerate(sources)]
    out = Path(args.out) if args.out else runs.storage_dir(cfg) / "data" / f"{cfg.name}-{args.part}"
    d = cfg.data
    print(f"writing {args.part} examples of {len(specs)} source(s) to {out}", flush=True)
    prepare(specs, d.tokenizer, str(out), max_input_len=d.max_input_len, max_hyper_len=d.max_hyper_len,
            max_target_len=d.max_target_len, on_bad_record=d.on_bad_record, seed=d.seed)
    print(stats_table(out))
    return 0


def stats_cmd(args: argparse.Namespace) -> int:
    from hint_platform.errors import UserError
    from pipelines import stats_table

    try:
        print(stats_table(args.path))
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    return 0
