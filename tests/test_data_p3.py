"""P3 on real SuperGLUE records and promptsource templates, and the pre-rendered T0 files."""

import json

import pytest

from pipelines import BadRecords, SourceSpec, SpecError, TokenBudget, iter_records, load_tokenizer, p3
from pipelines.p3_templates import Template, load_templates, to_hf_fields


def raw_spec(shared_data, dataset, split="val", fmt="joint"):
    subset = dataset.split("/")[1].split(".")[0]
    return SourceSpec.from_dict({
        "kind": "p3", "format": fmt, "dataset": dataset, "part": "test",
        "path": str(shared_data / "p3" / "raw" / "super_glue" / subset / f"{split}.jsonl"),
        "templates": str(shared_data / "p3" / "promptsource_templates")})


@pytest.fixture(scope="module")
def budget(shared_data):
    return TokenBudget(load_tokenizer(shared_data / "tokenizer" / "t5"))


def examples_of(spec, budget):
    return {task: list(stream) for task, stream in p3.task_streams(spec, budget, BadRecords(), seed=0)}


def test_rte_joint_known_answer(shared_data, budget):
    by_task = examples_of(raw_spec(shared_data, "super_glue/rte"), budget)
    ex = by_task["super_glue/rte/MNLI crowdsource"][0]
    # RTE val record 0 is labelled not_entailment -> class 1 -> "No".
    assert ex.hyper == ('[premise] Using only the above description and what you know about the world, '
                        'is "[hypothesis]" definitely correct? Yes or no?')
    assert ex.input.startswith("Dana Reeve, the widow of the actor Christopher Reeve")
    assert ex.input.endswith('is "Christopher Reeve had an accident." definitely correct? Yes or no?')
    assert (ex.target, ex.answer_choices, ex.answer_index) == ("No", ["Yes", "No"], 1)
    assert all(len(v) == 277 for v in by_task.values())


def test_cb_copa_wic_wsc_answers_and_choices(shared_data, budget):
    cb = examples_of(raw_spec(shared_data, "super_glue/cb"), budget)["super_glue/cb/can we infer"][0]
    assert (cb.target, cb.answer_choices) == ("No", ["Yes", "No", "Maybe"])  # contradiction -> 1
    copa = examples_of(raw_spec(shared_data, "super_glue/copa"), budget)["super_glue/copa/exercise"][0]
    assert copa.target == "Water flowed from the spout." and copa.answer_index == 1
    wic = examples_of(raw_spec(shared_data, "super_glue/wic"), budget)
    assert all(e.answer_choices and e.answer_index >= 0 for v in wic.values() for e in v)
    wsc = examples_of(raw_spec(shared_data, "super_glue/wsc.fixed"), budget)["super_glue/wsc.fixed/does the pronoun refer to"][0]
    assert '"him" refer to anyone? Yes or no?' in wsc.input and wsc.target == "No"


def test_copa_templates_for_one_question_type_skip_the_others(shared_data, budget):
    by_task = examples_of(raw_spec(shared_data, "super_glue/copa"), budget)
    assert 0 < len(by_task["super_glue/copa/…What could happen next, C1 or C2?"]) < 100
    assert len(by_task["super_glue/copa/exercise"]) == 100


def test_split_format_lists_fields_in_template_order(shared_data, budget):
    ex = examples_of(raw_spec(shared_data, "super_glue/rte", fmt="split"), budget)["super_glue/rte/GPT-3 style"][0]
    assert ex.input == ("premise: Dana Reeve, the widow of the actor Christopher Reeve, has died of lung cancer at "
                        "age 44, according to the Christopher Reeve Foundation.\n"
                        "hypothesis: Christopher Reeve had an accident.")
    assert ex.hyper == "[premise]\nQuestion: [hypothesis] True or False?"


def test_superglue_mapping():
    assert to_hf_fields("super_glue/rte", {"label": "entailment"})["label"] == 0
    assert to_hf_fields("super_glue/cb", {"label": "neutral"})["label"] == 2
    assert to_hf_fields("super_glue/wic", {"label": True})["label"] == 1
    wsc = to_hf_fields("super_glue/wsc.fixed", {"label": False, "target": {"span1_text": "a", "span2_index": 3}})
    assert wsc == {"label": 0, "span1_text": "a", "span2_index": 3}
    with pytest.raises(KeyError, match="'maybe' is not one of entailment, not_entailment"):
        to_hf_fields("super_glue/rte", {"label": "maybe"})


def test_template_rendering_protects_pipes_and_has_promptsource_filters():
    t = Template(id="t", name="n", jinja="{{ a }} {{ [b, b] | choice }} ||| {{ answer_choices[0] }}",
                 answer_choices="x ||| y")
    assert t.render({"a": "p|||q", "b": "B"}) == ("p|||q B", "x", ["x", "y"])


def test_rendered_t0_files_recover_their_templates(shared_data, budget):
    spec = SourceSpec.from_dict({"kind": "p3_rendered", "part": "test",
                                 "path": str(shared_data / "p3" / "t0_train_rendered" / "ag_news_*.jsonl.gz"),
                                 "templates": str(shared_data / "p3" / "promptsource_templates")})
    by_task = examples_of(spec, budget)
    assert len(by_task) == 7
    ex = by_task["ag_news_classify_question_first"][0]
    assert ex.hyper.startswith("What label best describes this news article?\n[text]")
    assert not ex.target.endswith("<|endoftext|>") and ex.target
    assert sum(len(v) for v in by_task.values()) > 1000


def test_sampling_cap():
    exs = list(range(10))
    assert list(p3.capped(iter(exs), num_templates=2, cap=20)) == exs  # small dataset: all
    assert list(p3.capped(iter(exs), num_templates=2, cap=8)) == [0, 1, 2, 3]  # over the cap: cap / templates


def test_p3_rows_through_the_tokenizer(shared_data):
    rows = list(iter_records([raw_spec(shared_data, "super_glue/cb").to_dict()],
                             str(shared_data / "tokenizer" / "t5"), max_input_len=64))
    assert len(rows) == sum(1 for _ in rows) and rows[0]["answer_choices"] and rows[0]["answer_index"] >= 0
    assert len(rows[0]["input_ids"]) <= 64 and rows[0]["hyper_input_ids"]


def test_real_template_files_all_load(shared_data):
    for path in (shared_data / "p3" / "promptsource_templates").rglob("templates.yaml"):
        assert all(isinstance(t, Template) for t in load_templates(str(path), path.read_text()))


def test_evaluation_scores_only_original_task_templates_with_choices(shared_data, budget, tmp_path):
    """all_t0_tasks.py's t0_eval_score_eval: story_cloze's 'Generate Ending' (answer choices, not
    the original task) is trained on but not scored."""
    record = {"input_sentence_1": "Tom was hungry.", "input_sentence_2": "He opened the fridge.",
              "input_sentence_3": "It was empty.", "input_sentence_4": "He went to the shop.",
              "sentence_quiz1": "He bought bread.", "sentence_quiz2": "He flew to the moon.",
              "answer_right_ending": 1}
    path = tmp_path / "story_cloze.jsonl"
    path.write_text(json.dumps(record) + "\n")
    spec = {"kind": "p3", "format": "joint", "dataset": "story_cloze/2016", "path": str(path),
            "templates": str(shared_data / "p3" / "promptsource_templates")}
    train = examples_of(SourceSpec.from_dict(spec), budget)
    test = examples_of(SourceSpec.from_dict({**spec, "part": "test"}), budget)
    assert len(train) == 6 and "story_cloze/2016/Generate Ending" in train
    assert sorted(test) == sorted(set(train) - {"story_cloze/2016/Generate Ending"})
    assert all(ex.answer_choices == ["He bought bread.", "He flew to the moon."] for v in test.values() for ex in v)


# Two entries of the reference's seqio_tasks/all_edited_prompts.txt, verbatim.
EDITED = ("super_glue_rte\t||||\tgpt_3_style\t||||\t[PREMISE]\nQuestion: [HYPOTHESIS] True or False?\n"
          "****************************\n"
          "super_glue_rte\t||||\tMNLI_crowdsource\t||||\t[PREMISE] Using only the above description and what "
          "you know about the world, is \"[HYPOTHESIS]\" definitely correct? Yes or no?\n"
          "****************************\n")


def test_hypernetwork_reads_the_reference_edited_prompts_masked(shared_data, budget, tmp_path, caplog):
    (tmp_path / "all_edited_prompts.txt").write_text(EDITED)
    spec = raw_spec(shared_data, "super_glue/rte").to_dict() | {"edited_prompts": str(tmp_path / "all_edited_prompts.txt")}
    by_task = examples_of(SourceSpec.from_dict(spec), budget)
    assert by_task["super_glue/rte/GPT-3 style"][0].hyper == "[MASK]\nQuestion: [MASK] True or False?"
    assert by_task["super_glue/rte/MNLI crowdsource"][0].hyper.startswith("[MASK] Using only the above")
    # The other 8 templates are not in this file: masked automatically, in one counted warning.
    assert by_task["super_glue/rte/can we infer"][0].hyper.startswith("Suppose [premise] Can we infer")
    assert "8 template(s) of super_glue/rte have no prompt in" in caplog.text
    with pytest.raises(SpecError, match="edited_prompts file not found"):
        examples_of(SourceSpec.from_dict(spec | {"edited_prompts": str(tmp_path / "nope.txt")}), budget)
