"""The mixed stream end to end: plain Python rows, the Ray Data pipeline, collate."""

import pytest
import torch

from pipelines import build_dataset, iter_records, train_tokenizer, write_suite
from pipelines.collate import collate

LENS = {"max_input_len": 32, "max_hyper_len": 48, "max_target_len": 16}


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    s = write_suite(root, num_train_tasks=25, num_test_tasks=4, instances_per_task=10, num_pretrain_docs=30)
    train_tokenizer(s.texts(), root / "tok", vocab_size=200)
    return s, str(root / "tok")


def test_mixed_rows_are_deterministic_and_mix_tasks(suite):
    s, tok = suite
    specs = [s.sni_spec("def"), s.c4_spec(segment_len=32, weight=0.5)]
    rows = list(iter_records(specs, tok, seed=1, **LENS))
    assert rows == list(iter_records(specs, tok, seed=1, **LENS))
    assert [r["example_index"] for r in rows] == list(range(len(rows)))
    assert [r["task"] for r in rows] != [r["task"] for r in iter_records(specs, tok, seed=2, **LENS)]
    first = rows[:64]
    assert len({r["task"] for r in first}) > 20  # train part: tasks interleaved, c4 mixed in
    assert 5 < sum(r["task"] == "c4" for r in first) < 40
    for r in rows:
        assert r["input_ids"][-1] == 1 and r["labels"][-1] == 1 and r["hyper_input_ids"][-1] == 1
        assert len(r["input_ids"]) <= 32 and len(r["hyper_input_ids"]) <= 48 and len(r["labels"]) <= 16
    sni_rows = [r for r in rows if r["task"] != "c4"]
    assert len(sni_rows) == 25 * 10 and all(r["references"] for r in sni_rows)


def test_same_specs_and_seed_give_the_same_stream(suite):
    """What resume relies on: the rows and their example_index are a function of specs and seed."""
    s, tok = suite
    specs = [s.sni_spec("def_pos"), s.c4_spec(segment_len=32)]
    rows = list(iter_records(specs, tok, **LENS))
    assert list(iter_records(specs, tok, **LENS)) == rows
    assert [r["example_index"] for r in rows] == list(range(len(rows)))
    assert list(iter_records(specs, tok, seed=1, **LENS)) != rows


def test_test_part_goes_task_by_task(suite):
    s, tok = suite
    rows = list(iter_records([s.sni_spec("concat", part="test")], tok, **LENS))
    tasks = [r["task"] for r in rows]
    assert tasks == sorted(tasks, key=s.test_tasks.index) and len(rows) == 4 * 10
    assert all(r["hyper_input_ids"] == [] for r in rows)  # concat: no hypernetwork input


def test_ray_dataset_matches_iter_records_and_gives_padded_batches(suite, ray_local):
    s, tok = suite
    specs = [s.sni_spec("def"), s.c4_spec(segment_len=32)]
    ds = build_dataset(specs, tok, seed=3, **LENS)
    expected = list(iter_records(specs, tok, seed=3, **LENS))
    got = ds.take_all()
    assert [r["example_index"] for r in got] == [r["example_index"] for r in expected]
    assert [list(r["input_ids"]) for r in got] == [r["input_ids"] for r in expected]
    batch = next(iter(ds.iter_torch_batches(batch_size=8, collate_fn=collate)))
    assert batch["input_ids"].shape[0] == 8 and batch["labels"].dtype == torch.long
    assert (batch["attention_mask"].sum(1) == torch.tensor([len(r["input_ids"]) for r in expected[:8]])).all()


def test_collate_pads_to_the_longest_and_masks_labels():
    rows = [{"hyper_input_ids": [5, 6, 1], "input_ids": [7, 1], "labels": [9, 1]},
            {"hyper_input_ids": [], "input_ids": [7, 8, 9, 1], "labels": [1]},
            {"hyper_input_ids": [5, 6, 1], "input_ids": [2, 1], "labels": [1]}]
    b = collate(rows)
    # one row per distinct instruction, in order of first appearance; task_index per example
    assert b["hyper_input_ids"].tolist() == [[5, 6, 1], [0, 0, 0]]
    assert b["hyper_attention_mask"].tolist() == [[1, 1, 1], [0, 0, 0]]
    assert b["task_index"].tolist() == [0, 1, 0]
    assert b["input_ids"].tolist() == [[7, 1, 0, 0], [7, 8, 9, 1], [2, 1, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert b["labels"].tolist() == [[9, 1], [1, -100], [1, -100]]
    empty = collate([{"hyper_input_ids": [], "input_ids": [1], "labels": [1]}])
    assert empty["hyper_input_ids"].shape == (1, 1) and empty["hyper_attention_mask"].sum() == 0
