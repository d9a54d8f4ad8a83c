"""The evaluation loop on a real (tiny, untrained) HintModel and real records: modules are
generated once per task and give the same outputs as generating them with every batch."""

import json

import pytest
import torch

from hint_model import HintConfig, HintModel
from hint_platform.evaluation.inference import choose_answers, predict_records, task_modules
from hint_platform.evaluation.metrics import score_predictions
from pipelines import iter_records, load_tokenizer, train_tokenizer, write_suite
from pipelines.sni import sni_categories


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    s = write_suite(root / "data", num_train_tasks=21, num_test_tasks=3, instances_per_task=5,
                    num_pretrain_docs=5)
    train_tokenizer(s.texts(), root / "tok", vocab_size=200)
    return s, str(root / "tok")


def _model(vocab_size, variant="hint"):
    torch.manual_seed(0)
    return HintModel(HintConfig.preset("tiny", variant=variant, vocab_size=vocab_size)).eval()


def test_modules_once_per_task_and_same_outputs_as_uncached(suite):
    s, tok_dir = suite
    tok = load_tokenizer(tok_dir)
    records = list(iter_records([s.sni_spec(part="test", max_per_task=3)], tok_dir,
                                max_input_len=32, max_hyper_len=64, max_target_len=16))
    model = _model(tok.vocab_size)
    calls = []
    generate_modules = model.generate_modules
    model.generate_modules = lambda *a, **k: calls.append(1) or generate_modules(*a, **k)
    predictions = predict_records(model, tok, records, batch_size=2, max_new_tokens=6)
    assert len(calls) == len(s.test_tasks) == 3
    assert [p["task"] for p in predictions] == [r["task"] for r in records]
    for record, pred in zip(records, predictions):
        ids = torch.tensor([record["input_ids"]])
        hyper = torch.tensor([record["hyper_input_ids"]])
        out = model.generate(ids, torch.ones_like(ids), hyper_input_ids=hyper, max_new_tokens=6)
        assert pred["prediction"] == tok.decode(out[0].tolist()).strip()
        assert pred["references"] == record["references"]
    report = score_predictions(predictions)
    assert set(report.per_task) == set(s.test_tasks)
    assert 0.0 <= report.overall["rougeL"] <= 100.0


def test_rank_classification_picks_the_highest_scoring_choice(suite):
    s, tok_dir = suite
    tok = load_tokenizer(tok_dir)
    model = _model(tok.vocab_size, variant="concat")
    choices = ["red fox", "blue owl", "none"]
    records = [{"task": "toy/t1", "input_ids": tok.encode(text), "answer_choices": choices, "answer_index": 0}
               for text in ("cat 3 dog", "pink 7 hen gold")]
    modules = task_modules(model, ())
    picked = choose_answers(model, tok, modules, records, batch_size=2)
    for record, p in zip(records, picked):
        ids = torch.tensor([record["input_ids"]] * 3)
        labels = torch.nn.utils.rnn.pad_sequence([torch.tensor(tok.encode(c)) for c in choices],
                                                 batch_first=True, padding_value=-100)
        assert p == int(model.score(ids, torch.ones_like(ids), labels).argmax())
    predictions = predict_records(model, tok, records)
    assert score_predictions(predictions).overall["accuracy"] in (0.0, 50.0, 100.0)


def test_sni_categories_from_real_task_files(shared_data):
    tasks_dir = shared_data / "sni" / "tasks"
    names = (shared_data / "sni" / "splits" / "mini" / "test_tasks.txt").read_text().split()
    cats = sni_categories(tasks_dir, names)
    assert set(cats) == set(names)
    for name in names:
        assert cats[name] == json.loads((tasks_dir / f"{name}.json").read_text())["Categories"][0]


def test_gflops_per_task_hint_reads_the_instruction_once(suite):
    from hint_model.flops import task_cost
    from hint_platform.evaluation.evaluate import mean_gflops_per_task

    s, tok_dir = suite
    lengths = dict(max_input_len=128, max_hyper_len=64, max_target_len=16)
    spec = dict(part="test", max_per_task=5)
    hint_rows = list(iter_records([s.sni_spec(format="def", **spec)], tok_dir, **lengths))
    concat_rows = list(iter_records([s.sni_spec(format="concat", **spec)], tok_dir, **lengths))
    hint_cfg = HintConfig.preset("tiny", vocab_size=200)
    concat_cfg = HintConfig.preset("tiny", variant="concat", vocab_size=200)
    one_task = [r for r in hint_rows if r["task"] == hint_rows[0]["task"]]
    n = len(one_task)
    t, i, o = (round(sum(len(r[k]) for r in one_task) / n) for k in ("hyper_input_ids", "input_ids", "labels"))
    assert mean_gflops_per_task(hint_cfg, one_task) == pytest.approx(task_cost(hint_cfg, n, t, i, o).hint / 1e9)
    assert mean_gflops_per_task(hint_cfg, hint_rows) < mean_gflops_per_task(concat_cfg, concat_rows)


def test_evaluation_runs_in_ray_workers_and_scores_as_in_process(suite, ray_local, tmp_path):
    """`evaluate_export` (hint eval, hint paper run) loads the model in Ray workers, never in
    the driver, spreads the tasks over them, and gives the in-process evaluation's metrics."""
    import os

    from hint_platform import config, export
    from hint_platform.evaluation.evaluate import evaluate_export
    from hint_platform.evaluation.workers import EvalWorkers

    s, tok_dir = suite
    tok = load_tokenizer(tok_dir)
    export.write(_model(tok.vocab_size), tmp_path / "export", tok_dir)
    spec = s.sni_spec(part="test", max_per_task=3)
    cfg = config.load("demo/finetune", [f"data.eval=[{json.dumps(spec)}]", "data.max_hyper_len=64",
                                        "data.max_input_len=32", "data.max_target_len=16"])
    report = evaluate_export(tmp_path / "export", cfg, batch_size=2, max_new_tokens=6,
                             workers=EvalWorkers(count=2, cpus=0.5))
    assert len(report.workers) == 2 and os.getpid() not in {w["pid"] for w in report.workers}
    assert {w["device"] for w in report.workers} == {"cpu"}

    model, _ = export.load(tmp_path / "export", device="cpu")
    records = list(iter_records([spec], tok_dir, max_input_len=32, max_hyper_len=64, max_target_len=16))
    here = score_predictions(predict_records(model, tok, records, batch_size=2, max_new_tokens=6))
    assert report.predictions == here.predictions
    assert {k: v for k, v in report.overall.items() if k != "gflops_per_task"} == here.overall
