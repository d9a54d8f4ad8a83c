"""hint data prepare / stats: parquet shards and a manifest with counts, lengths and skips."""

import gzip
import json

import pyarrow.parquet as pq
import pytest

from pipelines import BadRecordError, iter_records
from pipelines.prepare import load_manifest, prepare, stats_table

LENS = {"max_input_len": 64, "max_hyper_len": 64, "max_target_len": 8}


@pytest.fixture
def sources(tmp_path, shared_data):
    c4 = tmp_path / "c4.json.gz"
    docs = [json.dumps({"text": f"Document number {i} talks about cats and dogs."}).encode() for i in range(30)]
    c4.write_bytes(gzip.compress(b"\n".join(docs[:10] + [b"{not json"] + docs[10:]) + b"\n"))
    sni = {"kind": "sni", "path": str(shared_data / "sni"), "split": "mini", "part": "test", "max_per_task": 20}
    return [sni, {"kind": "c4", "path": str(c4), "segment_len": 16}]


def test_prepare_writes_the_rows_and_a_manifest(tmp_path, shared_data, sources):
    tok = str(shared_data / "tokenizer" / "t5")
    m = prepare(sources, tok, str(tmp_path / "out"), on_bad_record="skip", shard_rows=20, progress=False, **LENS)
    expected = list(iter_records(sources, tok, on_bad_record="skip", **LENS))
    written = [r for s in m["shards"] for r in pq.read_table(tmp_path / "out" / s["file"]).to_pylist()]
    assert written == expected and m["num_examples"] == len(expected) and len(m["shards"]) > 1
    assert m["tasks"]["task648_answer_generation"] == 20 and sum(m["tasks"].values()) == len(expected)
    assert m["bad_records"] == {"skipped": 1, "by_source": {sources[1]["path"]: 1}}
    assert m["token_lengths"]["labels"]["max"] <= 8 and m["token_lengths"]["labels"]["truncated"] > 0
    assert m["medians"]["instruction"] == m["token_lengths"]["hyper_input_ids"]["median"] > 0
    assert load_manifest(tmp_path / "out") == m

    table = stats_table(tmp_path / "out")
    assert f"{len(expected):,} examples" in table and "bad records skipped: 1" in table
    assert "task648_answer_generation" in table and "median" in table and "truncated" in table


def test_prepare_stops_on_a_bad_record_by_default(tmp_path, shared_data, sources):
    with pytest.raises(BadRecordError, match=r"c4.json.gz:11: invalid JSON"):
        prepare(sources, str(shared_data / "tokenizer" / "t5"), str(tmp_path / "out"), progress=False, **LENS)


def test_stats_of_a_missing_manifest_says_where(tmp_path):
    with pytest.raises(FileNotFoundError, match="no manifest.json at"):
        stats_table(tmp_path)
