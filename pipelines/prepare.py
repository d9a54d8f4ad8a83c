"""`hint data prepare` / `hint data stats`: tokenised parquet shards plus a manifest.

prepare() runs the same mixed stream as build_dataset (same rows, same order, same columns)
in this process and writes `shard-00000.parquet`, ... and `manifest.json`:

    num_examples, shards [{file, rows}], tasks {task: rows}, sources (the specs), tokenizer
    (vocab size, sha256 of spiece.model), lengths (the limits), seed, on_bad_record,
    token_lengths {hyper_input_ids|input_ids|labels: min, median, mean, p95, max, truncated},
    medians {instruction, input, output}   (the paper's Table 7 figures, in tokens)
    bad_records {skipped, by_source}

stats_table() renders a manifest as a table a person can read.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from pipelines.bad_records import BadRecords
from pipelines.budget import TokenBudget
from pipelines.dataset import as_specs, text_blocks, tokenize_block
from pipelines.spec import SourceSpec
from pipelines.tokenizer import load_tokenizer

MANIFEST = "manifest.json"
COLUMNS = {"hyper_input_ids": "instruction", "input_ids": "input", "labels": "output"}


def prepare(specs: Sequence[SourceSpec | dict], tokenizer_dir: str, out_dir: str, *, max_input_len: int = 1024,
            max_hyper_len: int = 1024, max_target_len: int = 256, on_bad_record: str = "error",
            seed: int = 0, shard_rows: int = 100_000, progress: bool = True) -> dict[str, Any]:
    """Tokenise the sources into out_dir (parquet shards + manifest.json); return the manifest."""
    specs = as_specs(specs)
    tok = load_tokenizer(tokenizer_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    limits = {"hyper_input_ids": max_hyper_len, "input_ids": max_input_len, "labels": max_target_len}
    bad = BadRecords(on_bad_record)
    lengths: dict[str, list[int]] = {c: [] for c in COLUMNS}
    tasks: Counter[str] = Counter()
    shards: list[dict[str, Any]] = []
    writer, start, last_report = None, time.monotonic(), 0.0
    budget = TokenBudget(tok, max_input_len, max_hyper_len, max_target_len)
    for block in text_blocks(specs, budget, on_bad_record=on_bad_record, seed=seed, bad=bad):
        rows = tokenize_block(block, tok.proto, max_input_len, max_hyper_len, max_target_len)
        written = 0
        while written < rows.num_rows:
            if writer is None or shards[-1]["rows"] == shard_rows:
                if writer:
                    writer.close()
                shards.append({"file": f"shard-{len(shards):05d}.parquet", "rows": 0})
                writer = pq.ParquetWriter(out / shards[-1]["file"], rows.schema)
            part = rows.slice(written, shard_rows - shards[-1]["rows"])
            writer.write_table(part)
            shards[-1]["rows"] += part.num_rows
            written += part.num_rows
        tasks.update(rows.column("task").to_pylist())
        for column in COLUMNS:
            lengths[column].extend(rows.column(column).combine_chunks().value_lengths().to_pylist())
        if progress and time.monotonic() - last_report > 2:
            last_report = time.monotonic()
            done = sum(s["rows"] for s in shards)
            print(f"prepare: {done:,} examples ({done / (last_report - start):,.0f}/s), "
                  f"{bad.skipped} bad records skipped", file=sys.stderr, flush=True)
    if writer:
        writer.close()
    manifest = {
        "num_examples": sum(s["rows"] for s in shards),
        "shards": shards,
        "tasks": dict(sorted(tasks.items())),
        "sources": [s.to_dict() for s in specs],
        "tokenizer": {"vocab_size": tok.vocab_size, "sha256": hashlib.sha256(tok.proto).hexdigest()},
        "lengths": {"max_input_len": max_input_len, "max_hyper_len": max_hyper_len, "max_target_len": max_target_len},
        "seed": seed,
        "on_bad_record": on_bad_record,
        "token_lengths": {c: _summary(lengths[c], limits[c]) for c in COLUMNS},
        "medians": {name: _summary(lengths[c], limits[c])["median"] for c, name in COLUMNS.items()},
        "bad_records": {"skipped": bad.skipped, "by_source": dict(bad.by_source)},
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
    if progress:
        print(f"prepare: wrote {manifest['num_examples']:,} examples in {len(shards)} shard(s) to {out} "
              f"in {time.monotonic() - start:.1f}s; {bad.skipped} bad records skipped", file=sys.stderr)
    return manifest


def _summary(lengths: list[int], limit: int) -> dict[str, float]:
    if not lengths:
        return {"min": 0, "median": 0, "mean": 0, "p95": 0, "max": 0, "truncated": 0}
    a = np.asarray(lengths)
    return {"min": int(a.min()), "median": float(np.median(a)), "mean": round(float(a.mean()), 1),
            "p95": float(np.percentile(a, 95)), "max": int(a.max()), "truncated": int((a >= limit).sum())}


def load_manifest(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    file = path / MANIFEST if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no {MANIFEST} at {path} (write one with `hint data prepare CONFIG`)")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{file}:{e.lineno}: not valid JSON: {e.msg}") from None


def stats_table(path: str | Path, max_tasks: int = 30) -> str:
    """The manifest of a prepared directory (or manifest.json) as a readable table."""
    m = load_manifest(path)
    lines = [f"{m['num_examples']:,} examples in {len(m['shards'])} shard(s), {len(m['tasks'])} task(s); "
             f"tokenizer vocab {m['tokenizer']['vocab_size']:,}; seed {m['seed']}",
             f"bad records skipped: {m['bad_records']['skipped']} (on_bad_record: {m['on_bad_record']})"]
    lines += [f"  {source}: {n}" for source, n in m["bad_records"]["by_source"].items()]
    header = f"{'tokens':<12}{'min':>7}{'median':>9}{'mean':>9}{'p95':>9}{'max':>7}{'limit':>7}{'truncated':>11}"
    lines += ["", header, "-" * len(header)]
    limits = {"hyper_input_ids": "max_hyper_len", "input_ids": "max_input_len", "labels": "max_target_len"}
    for column, name in COLUMNS.items():
        s = m["token_lengths"][column]
        lines.append(f"{name:<12}{s['min']:>7}{s['median']:>9g}{s['mean']:>9g}{s['p95']:>9g}{s['max']:>7}"
                     f"{m['lengths'][limits[column]]:>7}{s['truncated']:>11}")
    width = max((len(t) for t in m["tasks"]), default=4) + 2
    lines += ["", f"{'task':<{width}}{'examples':>10}", "-" * (width + 10)]
    by_count = sorted(m["tasks"].items(), key=lambda kv: (-kv[1], kv[0]))
    lines += [f"{task:<{width}}{n:>10,}" for task, n in by_count[:max_tasks]]
    if len(by_count) > max_tasks:
        rest = sum(n for _, n in by_count[max_tasks:])
        lines.append(f"{f'... {len(by_count) - max_tasks} more tasks':<{width}}{rest:>10,}")
    return "\n".join(lines)
