"""Formats (exact strings on a real SNI task), tokenizer ids, source spec validation."""

import json

import pytest

from pipelines import SourceSpec, SpecError, formats, load_tokenizer, train_tokenizer

TASK = "task648_answer_generation"
DEFINITION = ("You will see a sentence and a given pronoun. Answer with the word in the sentence to "
              "which the pronoun is referring.")
EX1 = "text: this book introduced shakespeare to ovid; it was a fine selection of his writing.; pronoun: his"
INPUT = "text: the city councilmen refused the demonstrators a permit because they feared violence.; pronoun: they"


@pytest.fixture(scope="module")
def task(shared_data):
    return json.loads((shared_data / "sni" / "tasks" / f"{TASK}.json").read_text())


def test_real_task_is_what_the_strings_below_assume(task):
    assert task["Definition"] == [DEFINITION]
    assert task["Positive Examples"][0]["input"] == EX1
    assert task["Instances"][0]["input"] == INPUT


def test_hint_def(task):
    assert formats.sni_def(task["Definition"][0], INPUT) == (DEFINITION, INPUT)


def test_hint_def_pos_prepends_the_examples_in_reverse(task):
    hyper = formats.sni_def_pos_hyper(task["Definition"][0], task["Positive Examples"], 2, lambda text: True)
    assert hyper == (" Positive Example 2 -\nInput: text: madonna fired her trainer because she couldnt stand "
                     "her boyfriend.; pronoun: her.\n Output: trainer.\n"
                     f" Positive Example 1 -\nInput: {EX1}.\n Output: shakespeare.\n"
                     f"Definition: {DEFINITION}")


def test_tk_instruct_concat(task):
    hyper, text = formats.sni_concat(task["Definition"][0], task["Positive Examples"], 1, INPUT)
    assert hyper == ""
    assert text == (f"Definition: {DEFINITION}\n\n"
                    f" Positive Example 1 -\nInput: {EX1}.\n Output: shakespeare.\n\n"
                    f"Now complete the following example -\nInput: {INPUT}.\nOutput:")
    _, zero_shot = formats.sni_concat(task["Definition"][0], task["Positive Examples"], 0, INPUT)
    assert zero_shot == f"Definition: {DEFINITION}\n\nNow complete the following example -\nInput: {INPUT}.\nOutput:"


def test_tk_instruct_adds_a_period_only_without_punctuation():
    _, text = formats.sni_concat("Say hi", [], 0, "x?")
    assert text == "Definition: Say hi.\n\nNow complete the following example -\nInput: x?\nOutput:"


def test_no_instruct_and_p3_formats():
    assert formats.no_instruct("  an input \n") == ("", "an input")
    assert formats.p3_joint("[premise] Yes or no?", "It rains. Yes or no?") == ("[premise] Yes or no?", "It rains. Yes or no?")
    assert formats.p3_split("[premise] or [hypothesis]?", [("premise", "A"), ("hypothesis", "B")]) == (
        "[premise] or [hypothesis]?", "premise: A\nhypothesis: B")
    assert formats.p3_concat("Q? ") == ("", "Q?")


def test_t5_tokenizer_known_ids(shared_data):
    tok = load_tokenizer(shared_data / "tokenizer" / "t5")
    assert tok.encode("Translate English to German: hello") == [30355, 15, 1566, 12, 2968, 10, 21820, 1]
    assert (tok.pad_id, tok.eos_id, tok.vocab_size) == (0, 1, 32000)
    assert tok.encode("Translate English to German: hello", max_len=4) == [30355, 15, 1566, 1]
    assert tok.decode([30355, 15, 1566, 1, 55, 0]) == "Translate English"


def test_trained_tokenizer_roundtrips(tmp_path):
    texts = [f"the {c} fox jumps over {n} lazy dogs" for c in ("red", "blue", "gray") for n in range(30)]
    tok = train_tokenizer(texts, tmp_path / "tok", vocab_size=100)
    again = load_tokenizer(tmp_path / "tok")
    assert again.encode("the blue fox") == tok.encode("the blue fox")
    assert again.encode("the blue fox")[-1] == 1 and again.decode(again.encode("the blue fox")) == "the blue fox"


def test_missing_tokenizer_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="spiece.model"):
        load_tokenizer(tmp_path)


@pytest.mark.parametrize("bad, message", [
    ({"kind": "sni", "path": "x", "formt": "def"}, "unknown key 'formt'"),
    ({"kind": "sni", "path": "x", "format": "joint"}, "format: 'joint' is not valid for kind 'sni'"),
    ({"kind": "wiki", "path": "x"}, "kind: 'wiki'"),
    ({"kind": "sni"}, "missing key 'path'"),
    ({"kind": "sni", "path": "x", "weight": "heavy"}, "weight: expected float"),
    ({"kind": "sni", "path": "x", "part": "dev"}, "part: 'dev'"),
    ({"kind": "p3", "path": "x"}, "needs 'templates'"),
])
def test_spec_errors_name_the_key(bad, message):
    with pytest.raises(SpecError, match=message):
        SourceSpec.from_dict(bad)


def test_spec_defaults():
    spec = SourceSpec.from_dict({"kind": "sni", "path": "x", "format": "def_pos", "weight": 2})
    assert (spec.num_pos, spec.weight, spec.max_per_task) == (2, 2.0, 100)
    assert SourceSpec.from_dict({"kind": "c4", "path": "x"}).format == "pretrain"
