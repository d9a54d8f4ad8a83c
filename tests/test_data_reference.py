"""The data as the reference (allenai/hyper-task-descriptions) builds it, on the real samples:
SNI strings (ni_registry.py, ni_collator.py), C4 split points (c4_registry.py, c4_registry_4part.py)
and P3 few-shot (seqio_tasks/few_shot.py)."""

import json
import random
import statistics

import pytest

from pipelines import BadRecords, SourceSpec, SpecError, TokenBudget, c4, iter_records, load_tokenizer, p3, sni

ALGEBRA = "task664_mmmlu_answer_generation_abstract_algebra"
DEFINITION = "The following are multiple choice questions (with answers) about  abstract algebra."
POSITIVE_1 = (" Positive Example 1 -\nInput: Find all c in Z_3 such that Z_3[x]/(x^2 + c) is a field.\n"
              "(A)0 (B)1 (C)2 (D)3.\n Output: B.\n")
POSITIVE_2 = (" Positive Example 2 -\nInput: Statement 1 | If aH is an element of a factor group, then |aH| "
              "divides |a|. Statement 2 | If H and K are subgroups of G then HK is a subgroup of G.\n"
              "(A)True, True (B)False, False (C)True, False (D)False, True.\n Output: B.\n")
XSUM = "task1290_xsum_summarization"


@pytest.fixture(scope="module")
def t5(shared_data):
    return load_tokenizer(shared_data / "tokenizer" / "t5")


def sni_examples(shared_data, task, budget, **spec):
    spec = SourceSpec.from_dict({"kind": "sni", "path": str(shared_data / "sni"), "part": "test", **spec})
    return list(sni.task_examples(spec, task, budget, BadRecords(), seed=0))


def test_sni_def_gives_the_hypernetwork_the_raw_stripped_definition(shared_data, t5):
    raw = json.loads((shared_data / "sni" / "tasks" / f"{ALGEBRA}.json").read_text())
    assert raw["Definition"] == [DEFINITION + "\n\n"]  # a real definition with trailing whitespace
    ex = sni_examples(shared_data, ALGEBRA, TokenBudget(t5), format="def", max_per_task=1)[0]
    assert (ex.hyper, ex.input) == (DEFINITION, raw["Instances"][0]["input"])


def test_sni_def_pos_prepends_the_examples_in_reverse_then_the_raw_definition(shared_data, t5):
    ex = sni_examples(shared_data, ALGEBRA, TokenBudget(t5), format="def_pos", num_pos=2, max_per_task=1)[0]
    assert ex.hyper == POSITIVE_2 + POSITIVE_1 + f"Definition: {DEFINITION}\n\n"


def test_sni_def_pos_drops_an_example_that_does_not_fit(shared_data, t5):
    """Example 1 fits exactly, example 2 then does not: it is left out whole, nothing is cut."""
    fits_one = len(t5.encode(f"Definition: {DEFINITION}\n\n" + POSITIVE_1))
    budget = TokenBudget(t5, max_hyper_len=fits_one)
    ex = sni_examples(shared_data, ALGEBRA, budget, format="def_pos", num_pos=2, max_per_task=1)[0]
    assert ex.hyper == POSITIVE_1 + f"Definition: {DEFINITION}\n\n"
    too_small = TokenBudget(t5, max_hyper_len=fits_one - 1)
    ex = sni_examples(shared_data, ALGEBRA, too_small, format="def_pos", num_pos=2, max_per_task=1)[0]
    assert ex.hyper == f"Definition: {DEFINITION}\n\n"


def test_tk_instruct_drops_examples_from_the_end_before_truncating(shared_data, t5):
    full = sni_examples(shared_data, ALGEBRA, TokenBudget(t5), format="concat", num_pos=2, max_per_task=1)[0]
    assert full.input.startswith(f"Definition: {DEFINITION}\n\n Positive Example 1 -")
    assert POSITIVE_2 + "\nNow complete the following example -\nInput: " in full.input
    assert full.input.endswith("(D)False, True.\nOutput:")
    one = len(t5.encode(full.input.replace(POSITIVE_2 + "\n", ""))) + 1
    ex = sni_examples(shared_data, ALGEBRA, TokenBudget(t5, max_input_len=one), format="concat", num_pos=2,
                      max_per_task=1)[0]
    assert ex.input == full.input.replace(POSITIVE_2 + "\n", "")  # example 2 gone whole, nothing cut


def test_tk_instruct_never_cuts_the_instance_or_the_output_cue(shared_data, t5):
    """xsum's inputs run to ~10k tokens: the definition stays, the instance's beginning fills the
    rest, and the ids end in `Output:` + EOS at exactly max_input_len."""
    budget = TokenBudget(t5, max_input_len=256)
    examples = sni_examples(shared_data, XSUM, budget, format="concat", num_pos=2, max_per_task=20)
    long = [ex for ex in examples if isinstance(ex.input, list)]
    assert len(long) >= 10
    cue = t5.encode("Output:", eos=False)
    definition = t5.encode(f"Definition: {json.loads((shared_data / 'sni' / 'tasks' / f'{XSUM}.json').read_text())['Definition'][0].strip()}", eos=False)
    for ex in long:
        assert len(ex.input) == 256 and ex.input[-len(cue) - 1:] == cue + [t5.eos_id]
        assert ex.input[:len(definition)] == definition
        assert "Now complete the following example - Input:" in t5.decode(ex.input).replace("\n", " ")


def test_tk_instruct_rows_all_end_in_the_output_cue_on_the_real_test_tasks(shared_data):
    spec = {"kind": "sni", "path": str(shared_data / "sni"), "split": "mini", "part": "test", "format": "concat",
            "num_pos": 2, "max_per_task": 30}
    rows = list(iter_records([spec], str(shared_data / "tokenizer" / "t5"), max_input_len=64))
    cue = load_tokenizer(shared_data / "tokenizer" / "t5").encode("Output:")
    assert len(rows) == 90 and all(r["input_ids"][-len(cue):] == cue for r in rows)


DRAWS = 20_000
EOS = 1  # an id outside the segments' range 100..
L = 512


def test_c4_split_points_are_nested_draws():
    """s1 ~ U[1, L-2), s2 ~ U[s1, L-2): parts average L/2, L/4, L/4 (a sorted pair of uniforms
    gives L/3 each, and P(x1 < L/4) = 0.44 instead of 0.25)."""
    rng = random.Random(0)
    segment = list(range(100, 100 + L))
    parts = [c4.split_segment(segment, rng, EOS) for _ in range(DRAWS)]
    x1, x2, x3 = ([len(p[i]) - 1 for p in parts] for i in range(3))
    assert abs(statistics.mean(x1) / L - 0.5) < 0.01
    assert abs(statistics.mean(x2) / L - 0.25) < 0.01 and abs(statistics.mean(x3) / L - 0.25) < 0.01
    assert abs(sum(n < L / 4 for n in x1) / DRAWS - 0.25) < 0.015
    assert (min(x1), max(x1), min(x2), min(x3)) == (1, L - 3, 0, 3)
    assert all(a[:-1] + b[:-1] + c[:-1] == segment for a, b, c in parts[:100])


def test_caclm_four_parts():
    """c4_registry_4part.py: s1 ~ U[1, L-4), s2 ~ U[s1, L-3), s3 ~ U[s2, L-2); the hypernetwork
    reads seg[:s1] EOS seg[s3:], the model seg[s1:s2], the target is seg[s2:s3]."""
    rng = random.Random(0)
    segment = list(range(100, 100 + L))
    sizes = []
    for _ in range(DRAWS):
        hyper, text, target = c4.split_segment_4part(segment, rng, EOS)
        s1 = hyper.index(EOS)
        assert hyper[-1] == text[-1] == target[-1] == EOS
        assert hyper[:s1] + text[:-1] + target[:-1] + hyper[s1 + 1:-1] == segment
        sizes.append((s1, len(text) - 1, len(target) - 1, len(hyper) - 2 - s1))
    a, b, c, d = (statistics.mean(s[i] for s in sizes) / L for i in range(4))
    assert abs(a - 1 / 2) < 0.01 and abs(b - 1 / 4) < 0.01 and abs(c - 1 / 8) < 0.01 and abs(d - 1 / 8) < 0.01
    assert min(s[0] for s in sizes) == 1 and min(s[3] for s in sizes) == 3


def test_caclm_source_on_the_real_c4_sample(shared_data):
    spec = {"kind": "c4", "path": str(shared_data / "c4" / "c4-en.olmo-test-fixtures.json.gz"), "format": "caclm",
            "segment_len": 128}
    rows = list(iter_records([spec], str(shared_data / "tokenizer" / "t5"), max_input_len=128, max_hyper_len=128,
                             max_target_len=128))
    assert len(rows) > 10 and all(r["task"] == "c4" for r in rows)
    full = rows[:-1]  # the last segment may be partial
    assert all(len(r["hyper_input_ids"]) + len(r["input_ids"]) + len(r["labels"]) == 128 + 4 for r in full)
    assert statistics.mean(len(r["hyper_input_ids"]) for r in full) > statistics.mean(len(r["input_ids"]) for r in full)


@pytest.mark.parametrize("bad, message", [
    ({"kind": "c4", "path": "x", "format": "caclm", "segment_len": 5}, "segment_len: format 'caclm' needs at least 6"),
    ({"kind": "c4", "path": "x", "format": "lm"}, "format: 'lm' is not valid for kind 'c4' \\(valid: pretrain, caclm\\)"),
    ({"kind": "sni", "path": "x", "num_shots": 2}, "num_shots/shots_path: few-shot sources need kind 'p3'"),
    ({"kind": "p3", "path": "x", "templates": "t", "dataset": "d", "num_shots": -1}, "num_shots: must be 0 or more"),
    ({"kind": "p3", "path": "x", "templates": "t", "dataset": "d", "shots_path": "y"}, "shots_path: set num_shots"),
    ({"kind": "p3", "path": "x", "templates": "t", "dataset": "d", "num_shots": 2, "part": "test"},
     "num_shots with part 'test' needs shots_path"),
])
def test_new_spec_options_are_validated(bad, message):
    with pytest.raises(SpecError, match=message):
        SourceSpec.from_dict(bad)


RTE_TEMPLATE = "super_glue/rte/GPT-3 style"


def rte_shots(shared_data, t5, fmt="joint", seed=0, **lengths):
    spec = SourceSpec.from_dict({
        "kind": "p3", "format": fmt, "dataset": "super_glue/rte", "part": "test", "num_shots": 2,
        "path": str(shared_data / "p3" / "raw" / "super_glue" / "rte" / "val.jsonl"),
        "shots_path": str(shared_data / "p3" / "raw" / "super_glue" / "rte" / "train.jsonl"),
        "templates": str(shared_data / "p3" / "promptsource_templates")})
    streams = dict(p3.task_streams(spec, TokenBudget(t5, **lengths), BadRecords(), seed=seed))
    return list(streams[RTE_TEMPLATE])


def rendered_train(shared_data, t5):
    """(prompt, target) of every RTE train record under the template, zero-shot."""
    spec = SourceSpec.from_dict({
        "kind": "p3", "format": "concat", "dataset": "super_glue/rte", "part": "test",
        "path": str(shared_data / "p3" / "raw" / "super_glue" / "rte" / "train.jsonl"),
        "templates": str(shared_data / "p3" / "promptsource_templates")})
    return [(ex.input, ex.target) for ex in dict(p3.task_streams(spec, TokenBudget(t5), BadRecords(), 0))[RTE_TEMPLATE]]


def split_shots(block):
    assert block.endswith("\n\n")
    return [tuple(s.rsplit(" Output: ", 1)) for s in block[:-2].split("\n\n")]


def test_p3_few_shot_hint_puts_the_shots_in_the_hypernetwork_input(shared_data, t5):
    shot_pool = rendered_train(shared_data, t5)
    assert len(shot_pool) == 32
    masked = "[premise]\nQuestion: [hypothesis] True or False?"
    zero = {ex.input: ex for ex in rte_shots(shared_data, t5, max_input_len=100_000)}
    examples = rte_shots(shared_data, t5, max_input_len=100_000)
    drawn = []
    for ex in examples:
        block, instruction = ex.hyper.split(" Definition: ")
        assert instruction == masked and ex.input in zero and ex.answer_choices == ["True", "False"]
        shots = split_shots(block)
        assert len(shots) == 2 and all(s in shot_pool for s in shots)
        drawn += shots
    # seqio's FewshotDataSource: consecutive groups of k from a shuffle of the train split, reshuffled each pass.
    assert sorted(drawn[:32]) == sorted(shot_pool) and sorted(drawn[32:64]) == sorted(shot_pool)
    assert drawn[:32] != shot_pool and drawn[:32] != drawn[32:64]
    assert [ex.hyper for ex in rte_shots(shared_data, t5, seed=1, max_input_len=100_000)] != [ex.hyper for ex in examples]


def test_p3_few_shot_t0_puts_the_shots_in_the_model_input(shared_data, t5):
    hint = rte_shots(shared_data, t5, max_input_len=100_000)
    t0 = rte_shots(shared_data, t5, fmt="concat", max_input_len=100_000)
    for h, t in zip(hint, t0):
        assert t.hyper == "" and t.input == (h.hyper.split(" Definition: ")[0] + " Definition: " + h.input).strip()


def test_p3_few_shot_prunes_shots_from_the_end_to_the_length(shared_data, t5):
    """few_shot.py: shot tokens (prompt + target) <= max_input_len - 64 - the example's input."""
    max_input_len = 300
    examples = rte_shots(shared_data, t5, max_input_len=max_input_len)
    kept = []
    for ex in examples:
        block = ex.hyper.split(" Definition: ")[0]
        shots = split_shots(block) if block else []
        used = sum(len(t5.encode(p, eos=False)) + len(t5.encode(t, eos=False)) for p, t in shots)
        assert not shots or used <= max_input_len - 64 - len(t5.encode(ex.input, eos=False))
        kept.append(len(shots))
    assert set(kept) == {0, 1, 2}


def test_p3_few_shot_train_part_draws_from_its_own_records(shared_data, t5):
    spec = SourceSpec.from_dict({
        "kind": "p3", "format": "joint", "dataset": "super_glue/rte", "num_shots": 1,
        "path": str(shared_data / "p3" / "raw" / "super_glue" / "rte" / "train.jsonl"),
        "templates": str(shared_data / "p3" / "promptsource_templates")})
    examples = list(dict(p3.task_streams(spec, TokenBudget(t5), BadRecords(), seed=0))[RTE_TEMPLATE])
    pool = rendered_train(shared_data, t5)
    shots = [split_shots(ex.hyper.split(" Definition: ")[0])[0] for ex in examples]
    assert len(examples) == 32 and sorted(shots) == sorted(pool)
