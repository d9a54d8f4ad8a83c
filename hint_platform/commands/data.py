"""`hint data prepare CONFIG` and `hint data stats PATH`: tokenise a config's sources once into
Parquet, and describe what a prepared (or any row-format Parquet) dataset holds."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("data", help="prepare and inspect training data",
                              description="Tokenise a config's data sources, and inspect prepared data.")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")

    prep = sub.add_parser(
        "prepare", help="tokenise a config's sources into Parquet",
        description="Stream the train (or eval) sources of CONFIG through the data pipeline on Ray "
                    "and write the rows (token ids, task, example_index, references...) as Parquet.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    prep.add_argument("config", help="experiment config YAML")
    prep.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dotted config overrides")
    prep.add_argument("--part", choices=("train", "eval"), default="train", help="which sources")
    prep.add_argument("--out", help="output directory (default: <run.storage_path>/data/<name>-<part>)")
    prep.set_defaults(func=prepare_cmd)

    stats = sub.add_parser("stats", help="rows, tasks and token lengths of prepared data",
                           description="Describe a directory of Parquet rows written by `hint data prepare`.")
    stats.add_argument("path", help="a directory written by `hint data prepare`")
    stats.set_defaults(func=stats_cmd)


def prepare_cmd(args: argparse.Namespace) -> int:
    import ray

    from hint_platform import config, tracking
    from hint_platform.errors import UserError
    from pipelines import SourceSpec, build_dataset

    cfg = config.load(args.config, args.overrides)
    sources = cfg.data.train if args.part == "train" else cfg.data.eval
    if not sources:
        raise UserError(f"{args.config}: data.{args.part} lists no sources")
    specs = [SourceSpec.from_dict(s, where=f"data.{args.part}[{i}]") for i, s in enumerate(sources)]
    out = Path(args.out) if args.out else tracking.storage_dir(cfg) / "data" / f"{cfg.name}-{args.part}"
    if not ray.is_initialized():
        ray.init(log_to_driver=False, include_dashboard=False)
    d = cfg.data
    ds = build_dataset(specs, d.tokenizer, max_input_len=d.max_input_len, max_hyper_len=d.max_hyper_len,
                       max_target_len=d.max_target_len, on_bad_record=d.on_bad_record, seed=d.seed)
    print(f"writing {args.part} rows of {len(specs)} source(s) to {out}", flush=True)
    ds.write_parquet(str(out))
    print(describe(out))
    return 0


def stats_cmd(args: argparse.Namespace) -> int:
    print(describe(Path(args.path)))
    return 0


def describe(path: Path) -> str:
    """Rows, tasks, skipped bad records and token-length percentiles of Parquet rows."""
    import numpy as np
    import pyarrow.compute as pc
    import pyarrow.dataset as pads

    from hint_platform.errors import UserError

    if not path.is_dir() or not any(path.glob("*.parquet")):
        raise UserError(f"{path}: no Parquet files (expected a directory from `hint data prepare`)")
    table = pads.dataset(str(path), format="parquet").to_table()
    missing = {"task", "input_ids", "labels"} - set(table.column_names)
    if missing:
        raise UserError(f"{path}: not prepared rows (missing columns: {', '.join(sorted(missing))})")
    tasks = pc.value_counts(table["task"]).to_pylist()
    lines = [f"{path}: {table.num_rows} rows, {len(tasks)} tasks"]
    if "bad_records_skipped" in table.column_names and table.num_rows:
        lines.append(f"bad records skipped: {pc.max(table['bad_records_skipped']).as_py()}")
    lines.append(f"{'tokens':<18}{'mean':>8}{'p50':>8}{'p95':>8}{'max':>8}")
    for column in ("hyper_input_ids", "input_ids", "labels"):
        if column in table.column_names and table.num_rows:
            n = pc.list_value_length(table[column]).to_numpy(zero_copy_only=False)
            lines.append(f"{column:<18}{n.mean():>8.1f}{np.percentile(n, 50):>8.0f}"
                         f"{np.percentile(n, 95):>8.0f}{n.max():>8d}")
    top = sorted(tasks, key=lambda t: -t["counts"])[:10]
    lines += [f"  {t['counts']:>7}  {t['values']}" for t in top]
    if len(tasks) > len(top):
        lines.append(f"  ... {len(tasks) - len(top)} more tasks")
    return "\n".join(lines)
