"""Readers on the real samples: SNI, C4 (and its splitter), and the synthetic suite."""

import json
import random

import pytest

from pipelines import BadRecords, SourceSpec, SpecError, TokenBudget, c4, load_tokenizer, sni, synthetic, train_tokenizer


@pytest.fixture(scope="module")
def t5(shared_data):
    return load_tokenizer(shared_data / "tokenizer" / "t5")


def sni_spec(shared_data, **kw):
    return SourceSpec.from_dict({"kind": "sni", "path": str(shared_data / "sni"), "split": "mini", **kw})


def test_sni_mini_split_counts(shared_data, t5):
    train = sni.split_tasks(sni_spec(shared_data))
    test = sni.split_tasks(sni_spec(shared_data, part="test"))
    assert (len(train), len(test)) == (77, 3)
    streams = sni.task_streams(sni_spec(shared_data, part="test", max_per_task=7), TokenBudget(t5), BadRecords(),
                               seed=0)
    examples = [ex for _, stream in streams for ex in stream]
    assert len(examples) == 21
    first = examples[0]
    raw = json.loads((shared_data / "sni" / "tasks" / f"{test[0]}.json").read_text())
    assert first.task == test[0] and first.input == raw["Instances"][0]["input"].strip()  # test part: first N
    assert first.references == raw["Instances"][0]["output"] and first.target == first.references[0]
    assert first.hyper == raw["Definition"][0].strip()


def test_sni_train_part_is_a_seeded_shuffle(shared_data, t5):
    spec = sni_spec(shared_data, max_per_task=5)
    name = sni.split_tasks(spec)[0]
    a = [ex.input for ex in sni.task_examples(spec, name, TokenBudget(t5), BadRecords(), seed=1)]
    b = [ex.input for ex in sni.task_examples(spec, name, TokenBudget(t5), BadRecords(), seed=1)]
    c = [ex.input for ex in sni.task_examples(spec, name, TokenBudget(t5), BadRecords(), seed=2)]
    assert a == b and a != c and len(a) == 5


def test_sni_missing_task_files_are_listed_or_warned(shared_data, caplog):
    with pytest.raises(SpecError, match=r"names 679 task\(s\) with no file.*task547_alt_translation_entk_en.* and 669 more"):
        sni.split_tasks(sni_spec(shared_data, split="default"))
    names = sni.split_tasks(sni_spec(shared_data, split="default", allow_missing_tasks=True))
    assert 0 < len(names) <= 77
    assert "have no file" in caplog.text


def test_sni_unknown_split_lists_the_known_ones(shared_data):
    with pytest.raises(SpecError, match=r"unknown split 'nope'.*default, mini"):
        sni.split_tasks(sni_spec(shared_data, split="nope"))


def test_c4_documents_of_every_sample_file(shared_data):
    docs = list(c4.Documents(str(shared_data / "c4" / "*.json.gz"), BadRecords()))
    assert len(docs) == 30 + 10 + 1480 + 20 + 2349
    assert all(isinstance(d, str) and d for d in docs)


def test_c4_packing_and_split(shared_data, t5):
    docs = c4.Documents(str(shared_data / "c4" / "c4-en.olmo-test-fixtures.json.gz"), BadRecords())
    segments = list(c4.segments(docs, t5, 128))
    assert len(segments) > 10 and all(len(s) == 128 for s in segments[:-1])
    assert sum(s.count(1) for s in segments) == 30  # each of the 30 documents ends in EOS
    rng = random.Random(0)
    for seg in segments:
        x1, x2, x3 = c4.split_segment(seg, rng, t5.eos_id)
        assert len(x1) + len(x2) + len(x3) == len(seg) + 3  # lengths add up, one EOS each
        assert x1[-1] == x2[-1] == x3[-1] == 1
        assert x1[:-1] + x2[:-1] + x3[:-1] == seg
        assert len(x1) >= 2 and len(x3) >= 2
    again = [c4.split_segment(seg, random.Random(0), t5.eos_id) for seg in segments[:1]]
    assert again[0] == c4.split_segment(segments[0], random.Random(0), t5.eos_id)
    assert {len(c4.split_segment(segments[0], random.Random(s), t5.eos_id)[0]) for s in range(10)} != {len(again[0][0])}


def test_c4_examples_are_reproducible(shared_data, t5):
    spec = SourceSpec.from_dict({"kind": "c4", "path": str(shared_data / "c4" / "c4-en.*.json.gz"),
                                 "segment_len": 64})
    a = [(e.hyper, e.input, e.target) for e in c4.C4Examples(spec, t5, BadRecords(), seed=3)]
    b = [(e.hyper, e.input, e.target) for e in c4.C4Examples(spec, t5, BadRecords(), seed=3)]
    c = [(e.hyper, e.input, e.target) for e in c4.C4Examples(spec, t5, BadRecords(), seed=4)]
    assert a == b and a != c


def test_c4_no_files_is_an_error(tmp_path):
    with pytest.raises(SpecError, match="no files match"):
        list(c4.Documents(str(tmp_path / "*.json.gz"), BadRecords()))


def test_synthetic_suite_is_deterministic_and_split_by_task(tmp_path):
    a = synthetic.write_suite(tmp_path / "a", num_train_tasks=20, num_test_tasks=6, instances_per_task=5,
                              num_pretrain_docs=4, seed=7)
    b = synthetic.write_suite(tmp_path / "b", num_train_tasks=20, num_test_tasks=6, instances_per_task=5,
                              num_pretrain_docs=4, seed=7)
    files_a = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files_a == sorted(p.relative_to(tmp_path / "b") for p in (tmp_path / "b").rglob("*") if p.is_file())
    for rel in files_a:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes()
    assert len(a.train_tasks) == 20 and len(a.test_tasks) == 6
    assert not set(a.train_tasks) & set(a.test_tasks)
    definitions = {n: json.loads((tmp_path / "a" / "sni" / "tasks" / f"{n}.json").read_text())["Definition"][0]
                   for n in a.train_tasks + a.test_tasks}
    assert not {definitions[n] for n in a.train_tasks} & {definitions[n] for n in a.test_tasks}
    other = synthetic.write_suite(tmp_path / "c", num_train_tasks=20, num_test_tasks=6, instances_per_task=5,
                                  num_pretrain_docs=4, seed=8)
    assert other.train_tasks != a.train_tasks


def test_synthetic_held_out_instructions_name_items_no_training_instruction_names(tmp_path):
    suite = synthetic.write_suite(tmp_path, num_train_tasks=180, num_test_tasks=24, instances_per_task=5,
                                  num_pretrain_docs=4)
    train, test = synthetic.split_tasks(180, 24, seed=0)
    assert [t.name for t in train] == suite.train_tasks and [t.name for t in test] == suite.test_tasks
    assert {t.item for t in test} == set(synthetic.HELD_OUT_ITEMS)
    assert not {t.item for t in train} & set(synthetic.HELD_OUT_ITEMS)
    assert {t.kind.name for t in test} == {t.kind.name for t in train} == {k.name for k in synthetic.KINDS}
    training_inputs = " ".join(json.loads((tmp_path / "sni" / "tasks" / f"{n}.json").read_text())["Instances"][0]
                               ["input"] for n in suite.train_tasks).split()
    assert set(synthetic.HELD_OUT_ITEMS) <= set(training_inputs)  # seen as items, never as a subject
    with pytest.raises(ValueError, match="num_train_tasks must be in"):
        synthetic.split_tasks(181, 2, seed=0)


def test_synthetic_tasks_compute_what_they_say():
    tasks = {t.name: t for t in synthetic.catalogue()}
    items = ["cat", "3", "red", "cat", "7"]
    expected = {
        "synthetic_exists_cat_1": ("Is cat in the list?", "yes"),
        "synthetic_exists_dog_2": ("Does the list contain dog?", "no"),
        "synthetic_count_cat_1": ("How many times does cat appear?", "2"),
        "synthetic_count_fox_2": ("Count each fox in the list.", "0"),
        "synthetic_remove_cat_1": ("Remove every cat from the list.", "3 red 7"),
        "synthetic_position_red_2": ("At which position is red first?", "3"),
        "synthetic_position_owl_1": ("Where is the first owl?", "none"),
        "synthetic_after_cat_1": ("Which item comes right after cat?", "3"),
        "synthetic_after_7_2": ("What follows the first 7?", "none"),
    }
    for name, (definition, answer) in expected.items():
        assert (tasks[name].definition, tasks[name].run(items)) == (definition, answer)
    assert tasks["synthetic_remove_cat_2"].run(["cat"]) == "none"


def test_synthetic_tokenizer_keeps_the_format_words_whole(tmp_path):
    suite = synthetic.write_suite(tmp_path, instances_per_task=5, num_pretrain_docs=4)
    tok = train_tokenizer(suite.texts(), tmp_path / "tok", vocab_size=600)
    for word in ("Definition", "Remove", "every", "Now", "complete", "following", "Input", "Output", "fox"):
        assert len(tok.encode(word, eos=False)) == 1, word


def test_readers_take_uris_through_pyarrow_filesystems(shared_data, t5):
    """file:// goes through pyarrow.fs, the same code path as s3:// or gs://."""
    uri = f"file://{shared_data}"
    docs = list(c4.Documents(f"{uri}/c4/c4-en.*.json.gz", BadRecords()))
    assert docs == list(c4.Documents(str(shared_data / "c4" / "c4-en.*.json.gz"), BadRecords()))
    assert len(docs) == 40
    spec = SourceSpec.from_dict({"kind": "sni", "path": f"{uri}/sni", "split": "mini", "part": "test",
                                 "max_per_task": 3})
    examples = [ex for _, stream in sni.task_streams(spec, TokenBudget(t5), BadRecords(), seed=0) for ex in stream]
    assert len(examples) == 9 and examples[0].task == "task1393_superglue_copa_text_completion"
    with pytest.raises(SpecError, match="unknown split 'nope'.*default, mini"):
        sni.split_tasks(SourceSpec.from_dict({"kind": "sni", "path": f"{uri}/sni", "split": "nope"}))
