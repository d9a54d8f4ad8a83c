"""The training stream as the reference mixes it: T0's examples-proportional mixture of capped
datasets, each dataset's records shuffled, a new order every pass; SNI's seeded target choice;
no EOS on P3's inputs."""

import json
from collections import Counter

import pytest

from pipelines import BadRecords, SourceSpec, TokenBudget, iter_records, load_tokenizer, sni

RTE_LABELS = {"entailment": 0, "not_entailment": 1}


@pytest.fixture(scope="module")
def mixture(shared_data, tmp_path_factory):
    """RTE's validation records sorted by label (as imdb's or rotten_tomatoes' files are) beside
    CB's: under a cap of 200, RTE (277 records, 10 templates) gives 20 records a template, 200 in
    all, and CB (56 records, 15 templates) all of its 840."""
    root = tmp_path_factory.mktemp("mixture")
    raw = shared_data / "p3" / "raw" / "super_glue"
    records = [json.loads(line) for line in (raw / "rte" / "val.jsonl").read_text().splitlines()]
    records.sort(key=lambda r: RTE_LABELS[r["label"]])
    (root / "rte.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    common = {"kind": "p3", "format": "joint", "example_cap": 200,
              "templates": str(shared_data / "p3" / "promptsource_templates")}
    specs = [{**common, "dataset": "super_glue/rte", "path": str(root / "rte.jsonl")},
             {**common, "dataset": "super_glue/cb", "path": str(raw / "cb" / "val.jsonl")}]
    return specs, str(shared_data / "tokenizer" / "t5")


def rows_of(mixture, **kw):
    specs, tok = mixture
    return list(iter_records(specs, tok, max_input_len=256, max_hyper_len=256, max_target_len=16, **kw))


@pytest.fixture(scope="module")
def first_pass(mixture):
    return rows_of(mixture)


def test_p3_mixture_follows_capped_sizes_from_the_first_rows(first_pass):
    rows = first_pass
    rte = [r for r in rows if r["task"].startswith("super_glue/rte/")]
    assert (len(rte), len(rows) - len(rte)) == (200, 840)
    for start in (0, 300, 800):  # every stretch of the pass, not only the whole of it
        share = sum(r["task"].startswith("super_glue/rte/") for r in rows[start:start + 200]) / 200
        assert 0.1 < share < 0.3, (start, share)  # 200 / 1040 = 0.19; drawn by source: 0.5
    per_template = Counter(r["task"] for r in rows[:520])
    assert len(per_template) == 25  # every template of both datasets within the first half


def test_p3_records_are_shuffled_and_the_cap_samples_them(first_pass):
    rows = first_pass
    rte = [r for r in rows if r["task"].startswith("super_glue/rte/")]
    # The file holds 146 entailment records first: a cap of the first 20 would have no other label.
    labels = Counter(r["answer_index"] for r in rte[:40])
    assert labels[0] and labels[1], labels
    one_template = [r["input_ids"] for r in rte if r["task"] == rte[0]["task"]]
    assert len(set(map(tuple, one_template))) == 20


def test_every_pass_reshuffles_and_a_seed_fixes_the_stream(mixture, first_pass):
    first, second = first_pass, rows_of(mixture, epoch=1)
    assert [r["example_index"] for r in second] == list(range(len(second))) and {r["epoch"] for r in second} == {1}
    assert [r["task"] for r in first] != [r["task"] for r in second]
    inputs = lambda rows: [r["input_ids"] for r in rows if r["task"] == "super_glue/rte/GPT-3 style"]
    assert inputs(first) != inputs(second)  # a new sample of 20 records, in a new order
    assert rows_of(mixture, num_epochs=2) == first + second  # same seed, same stream


def test_p3_inputs_and_instructions_have_no_eos_and_targets_do(first_pass):
    for r in first_pass:
        assert r["input_ids"][-1] != 1 and r["hyper_input_ids"][-1] != 1 and r["labels"][-1] == 1


def test_sni_training_target_is_a_seeded_choice_among_the_outputs(shared_data):
    spec = SourceSpec.from_dict({"kind": "sni", "path": str(shared_data / "sni"), "split": "mini"})
    name = "task131_scan_long_text_generation_action_command_long"
    budget = TokenBudget(load_tokenizer(shared_data / "tokenizer" / "t5"))
    examples = list(sni.task_examples(spec, name, budget, BadRecords(), seed=0))
    assert examples and all(ex.target in ex.references for ex in examples)
    assert sum(ex.target != ex.references[0] for ex in examples) > len(examples) // 4
    again = list(sni.task_examples(spec, name, budget, BadRecords(), seed=0))
    assert [ex.target for ex in again] == [ex.target for ex in examples]
    test = list(sni.task_examples(SourceSpec.from_dict({**spec.to_dict(), "part": "test"}), name, budget,
                                  BadRecords(), seed=0))
    assert all(ex.target == ex.references[0] for ex in test)
