"""Where `hint predict` puts its predictions, so that a failure loses only the batches in flight.

Each actor writes every batch it finishes as one Parquet part (written under a temporary name,
then renamed: a part is whole or absent) into a work directory named after the job's
fingerprint (model, sources, generation options): OUT/.predict-<fingerprint>/. A rerun of the
same command finds that directory and predicts only the ids no part holds yet. When every row
has a part, the parts are merged one at a time into OUT/predictions.parquet (written under a
temporary name and renamed: readers never see a partial file), each id once, and the work
directory goes.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

PREDICTIONS = "predictions.parquet"
SUMMARY = "summary.json"
OUTPUT = pa.schema([("id", pa.string()), ("task", pa.string()), ("input", pa.string()),
                    ("prediction", pa.string()), ("references", pa.list_(pa.string()))])


def fingerprint(job: dict[str, Any]) -> str:
    """What makes two runs the same job: equal fingerprints predict the same outputs."""
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def work_dir(out: Path, job_fingerprint: str) -> Path:
    return out / f".predict-{job_fingerprint}"


def finished(out: Path, job_fingerprint: str) -> dict[str, Any] | None:
    """The summary of this job when it was published in `out` before, else None."""
    try:
        summary = json.loads((out / SUMMARY).read_text())
    except (OSError, ValueError):
        return None
    done = summary.get("job") == job_fingerprint and (out / PREDICTIONS).is_file()
    return summary if done else None


def write_part(directory: str | Path, columns: dict[str, list]) -> tuple[str, int]:
    """One finished batch as a part, named after its ids: a retried batch overwrites its own
    part instead of adding a second copy. Returns (the part's name, its rows)."""
    table = pa.Table.from_pydict(columns, schema=OUTPUT)
    name = "part-" + hashlib.sha256("\n".join(columns["id"]).encode()).hexdigest()[:20] + ".parquet"
    directory = Path(directory)
    tmp = directory / f".{name}.{os.getpid()}.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, directory / name)
    return name, table.num_rows


def parts(directory: Path) -> list[Path]:
    return sorted(directory.glob("part-*.parquet"))


def written_ids(directory: Path) -> set[str]:
    """The ids the whole parts of an earlier attempt hold."""
    ids: set[str] = set()
    for part in parts(directory):
        ids.update(pq.read_table(part, columns=["id"]).column("id").to_pylist())
    return ids


def publish(directory: Path, out: Path, expected_ids: set[str]) -> list[dict[str, Any]]:
    """Merges the parts into out/predictions.parquet, part by part, each id once, and returns
    the rows with references (task, prediction, references) for scoring. Refuses to publish
    when a row has no part."""
    tmp = directory / f".{PREDICTIONS}.tmp"
    seen: set[str] = set()
    scored: list[dict[str, Any]] = []
    with pq.ParquetWriter(tmp, OUTPUT) as writer:
        for part in parts(directory):
            table = pq.read_table(part).select(OUTPUT.names).cast(OUTPUT)
            ids = table.column("id").to_pylist()
            keep = [i not in seen for i in ids]
            seen.update(ids)
            table = table.filter(pa.array(keep)) if not all(keep) else table
            writer.write_table(table)
            with_refs = table.filter(pc.greater(pc.list_value_length(table.column("references")), 0))
            scored += with_refs.select(["task", "prediction", "references"]).to_pylist()
    missing = expected_ids - seen
    if missing:
        tmp.unlink()
        raise RuntimeError(f"{len(missing)} row(s) have no prediction (e.g. {sorted(missing)[0]}); "
                           "run the same command again to predict them")
    os.replace(tmp, out / PREDICTIONS)
    return scored


def write_json(path: Path, data: dict) -> None:
    """`data` as JSON at `path`, whole or not at all."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def remove(directory: Path) -> None:
    shutil.rmtree(directory, ignore_errors=True)
