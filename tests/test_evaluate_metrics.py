"""The evaluation metrics on predictions whose scores were worked out by hand."""

import pytest

from hint_platform.evaluation.metrics import normalize_answer, rank_classification_accuracy, sni_metrics


def test_normalisation_is_snis_lowercase_punctuation_whitespace():
    assert normalize_answer("  The  Answer, is: 42! ") == "the answer is 42"
    # SNI keeps articles (unlike SQuAD): "an apple" and "apple" differ.
    assert normalize_answer("an apple") != normalize_answer("apple")


def test_sni_metrics_hand_checked():
    predictions = ["The answer.", "the cats sat", "xyz"]
    references = [["the answer"], ["dog", "the cat sat on the mat"], ["abc"]]
    # exact match: 1, 0, 0.  ROUGE-L (stemmed, best reference): 1; "the cat sat" vs six tokens,
    # LCS 3 -> P=1, R=1/2, F=2/3; 0.
    metrics = sni_metrics(predictions, references)
    assert metrics["exact_match"] == pytest.approx(100 / 3, abs=1e-3)
    assert metrics["rougeL"] == pytest.approx(100 * (1 + 2 / 3) / 3, abs=1e-3)


def test_sni_metrics_takes_the_best_reference():
    assert sni_metrics(["yes"], [["no", "Yes."]]) == {"exact_match": 100.0, "rougeL": 100.0}


def test_sni_metrics_rejects_mismatched_or_empty_references():
    with pytest.raises(ValueError, match="2 predictions for 1"):
        sni_metrics(["a", "b"], [["a"]])
    with pytest.raises(ValueError, match=r"references\[0\]"):
        sni_metrics(["a"], [[]])


def test_rank_classification_averages_per_template_then_dataset():
    results = [
        ("rte", "t1", True), ("rte", "t1", False),                       # 50
        ("rte", "t2", True),                                             # 100 -> rte 75
        ("cb", "t1", False), ("cb", "t1", False), ("cb", "t1", True),    # 33.3 -> cb 33.3
    ]
    acc = rank_classification_accuracy(results)
    assert acc["per_template"]["rte/t1"] == pytest.approx(50)
    assert acc["per_dataset"] == pytest.approx({"rte": 75.0, "cb": 100 / 3})
    assert acc["accuracy"] == pytest.approx((75 + 100 / 3) / 2)


def test_p3_task_names_split_at_the_dataset_even_with_slashes_in_the_template():
    from hint_platform.evaluation.metrics import split_p3_task

    task = "super_glue/cb/claim true/false/inconclusive"  # a real promptsource template name
    assert split_p3_task(task, {task: "super_glue/cb"}) == ("super_glue/cb", "claim true/false/inconclusive")
    assert split_p3_task("anli/GPT-3 style") == ("anli", "GPT-3 style")
