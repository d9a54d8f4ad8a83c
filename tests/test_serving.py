"""Serving a tiny HINT model for real: the cached predictor against HintModel.generate, and
ONE Ray Serve instance (real HTTP on loopback) deploying a model from a real MLflow registry
(SQLite store) by alias: answers, cache hits, eviction at the bound, mixed-task batches, and a
4xx with its reason for every bad request while the replica keeps serving."""

import asyncio
import json
import socket
import urllib.error
import urllib.request

import pytest
import torch

from hint_model import HintConfig, HintModel
from hint_platform.export import write as write_export
from hint_platform.serving.predictor import BadRequest, CachedPredictor
from hint_platform.tracking import registry
from hint_platform.tracking.runs import tracking_uri_scope
from pipelines import train_tokenizer, write_suite

MAX_HYPER = 48


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    """A tiny untrained HINT export (weights, config, tokenizer) and the suite's test tasks."""
    root = tmp_path_factory.mktemp("serving")
    suite = write_suite(root / "data", num_train_tasks=21, num_test_tasks=4, instances_per_task=6,
                        num_pretrain_docs=5)
    tok = train_tokenizer(suite.texts(), root / "tok", vocab_size=200)
    torch.manual_seed(0)
    model = HintModel(HintConfig.preset("tiny", vocab_size=tok.vocab_size, max_hyper_len=MAX_HYPER,
                                        max_target_len=6))
    out = write_export(model, root / "export", root / "tok")
    tasks = []
    for name in suite.test_tasks:
        task = json.loads((root / "data" / "sni" / "tasks" / f"{name}.json").read_text())
        tasks.append((task["Definition"][0], [i["input"] for i in task["Instances"]]))
    return out, suite, tasks


def test_predictor_outputs_equal_model_generate(export):
    out, _, tasks = export
    predictor = CachedPredictor(out, batch_size=4)
    model = predictor.model
    instructions = [tasks[i % 3][0] for i in range(9)]
    inputs = [tasks[i % 3][1][i // 3] for i in range(9)]
    got = predictor.predict(instructions, inputs)
    assert predictor.cache.stats.misses == 3 and predictor.cache.stats.hits == 0
    assert predictor.mixed_batches >= 1 or predictor.batches == 3
    for instruction, text, output in zip(instructions, inputs, got):
        hyper, model_input = predictor.texts(instruction, text)
        hyper_ids = torch.tensor([predictor.tokenizer.encode(hyper)])
        ids = torch.tensor([predictor.tokenizer.encode(model_input)])
        tokens = model.generate(ids, hyper_input_ids=hyper_ids)
        assert output == predictor.tokenizer.decode(tokens[0].tolist()).strip()
    predictor.predict(instructions[:3], inputs[:3])
    assert predictor.cache.stats.hits == 3


def test_cache_evicts_least_recently_used_at_its_bound(export):
    out, _, tasks = export
    probe = CachedPredictor(out)
    sizes = [probe.task_state(probe.task_key(t[0]))[0].nbytes for t in tasks[:3]]
    predictor = CachedPredictor(out, cache_mib=(sizes[0] + sizes[1]) / 2**20)
    keys = [predictor.task_key(t[0]) for t in tasks[:3]]
    for key in (keys[0], keys[1], keys[0], keys[2]):
        predictor.task_state(key)
    stats = predictor.cache.stats
    assert (stats.hits, stats.misses, stats.evictions) == (1, 3, 1)
    assert keys[1] not in predictor.cache and keys[0] in predictor.cache and keys[2] in predictor.cache
    assert stats.bytes <= stats.capacity_bytes


def test_bad_instructions_are_refused_with_the_reason(export):
    predictor = CachedPredictor(export[0])
    with pytest.raises(BadRequest, match="instruction is empty"):
        predictor.task_key("  ")
    with pytest.raises(BadRequest, match=f"more than the model's max_hyper_len={MAX_HYPER}"):
        predictor.task_key("word " * 200)


# ---- one Ray Serve instance for the rest of the module ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body=None, method: str | None = None, raw: bytes | None = None) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(export, ray_local, tmp_path_factory):
    """The export registered in a SQLite MLflow store, aliased `champion`, and served by alias."""
    from ray import serve

    from hint_platform.serving import app

    out, _, tasks = export
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    registry.log_and_register(out, tracking_uri=uri, name="hint-serve-test")
    registry.set_alias(uri, "hint-serve-test", "champion", 1)
    probe = CachedPredictor(out)
    size = max(probe.task_state(probe.task_key(t[0]))[0].nbytes for t in tasks)
    opts = app.ServeOptions(model="models:/hint-serve-test@champion", tracking_uri=uri, replicas=1,
                            cache_mib=2.5 * size / 2**20, max_inputs=8, max_batch_size=8,
                            batch_wait_ms=200.0, replica_cpus=0.5)
    port = _free_port()
    try:
        base = app.run(opts, port=port)
        yield base, probe, tasks, uri
    finally:
        serve.shutdown()


def test_served_model_from_registry_alias_answers_and_caches(served):
    base, probe, tasks, _ = served
    assert _call(f"{base}/v1/health") == (200, {"status": "ok"})
    instruction, inputs = tasks[0]
    status, created = _call(f"{base}/v1/tasks", {"instruction": instruction})
    assert status == 200, created
    status, first = _call(f"{base}/v1/predict", {"task_id": created["task_id"], "inputs": inputs[:3]})
    assert status == 200, first
    assert first["outputs"] == probe.predict([instruction] * 3, inputs[:3])
    assert first["cache_hit"] is True  # POST /v1/tasks generated it
    status, second = _call(f"{base}/v1/predict", {"instruction": tasks[1][0], "inputs": tasks[1][1][:1]})
    status, again = _call(f"{base}/v1/predict", {"instruction": tasks[1][0], "inputs": tasks[1][1][1:2]})
    assert (second["cache_hit"], again["cache_hit"]) == (False, True)
    assert second["task_id"] == again["task_id"]


def test_registered_pyfunc_generates_each_task_state_once(served):
    """What `mlflow models serve` runs: the logged pyfunc, over the same cached predictor."""
    import mlflow.pyfunc
    import pandas as pd

    _, probe, tasks, uri = served
    with tracking_uri_scope(uri):
        model = mlflow.pyfunc.load_model("models:/hint-serve-test@champion")
    frame = pd.DataFrame({"instruction": [tasks[0][0]] * 2, "input": tasks[0][1][:2]})
    first, second = list(model.predict(frame)), list(model.predict(frame))
    assert first == second == probe.predict([tasks[0][0]] * 2, tasks[0][1][:2])
    stats = model.unwrap_python_model().predictor.cache.stats
    assert (stats.misses, stats.hits) == (1, 1)


def test_served_cache_evicts_at_its_bound(served):
    base, _, tasks, _ = served
    before = _call(f"{base}/v1/stats")[1]
    for instruction, inputs in tasks:  # four tasks through a cache of 2.5 times the largest state
        assert _call(f"{base}/v1/predict", {"instruction": instruction, "inputs": inputs[:1]})[0] == 200
    after = _call(f"{base}/v1/stats")[1]
    assert after["evictions"] > before["evictions"]
    assert after["entries"] < len(tasks) and after["bytes"] <= after["capacity_bytes"]


def test_concurrent_requests_of_different_tasks_share_a_mixed_batch(served):
    base, probe, tasks, _ = served
    before = _call(f"{base}/v1/stats")[1]
    bodies = [{"instruction": tasks[i][0], "inputs": tasks[i][1][2:4]} for i in range(3)]

    async def all_at_once():
        return await asyncio.gather(*(asyncio.to_thread(_call, f"{base}/v1/predict", b) for b in bodies))

    results = asyncio.run(all_at_once())
    for body, (status, result) in zip(bodies, results):
        assert status == 200, result
        assert result["outputs"] == probe.predict([body["instruction"]] * 2, body["inputs"])
    assert _call(f"{base}/v1/stats")[1]["mixed_batches"] > before["mixed_batches"]


def test_a_tasks_requests_stay_on_the_replica_that_holds_its_state(served):
    """Two replicas (a second application, called through the replicas' own handle, so
    through TaskAffinityRouter): after its first request, every request of a task finds its
    state cached. Serve's default routing picks replicas at random: about half of these would
    miss (all 8 hit with probability 2**-8)."""
    from ray import serve

    from hint_platform.serving import app

    _, probe, tasks, uri = served
    opts = app.ServeOptions(model="models:/hint-serve-test@champion", tracking_uri=uri, replicas=2,
                            replica_cpus=0.5)
    serve.run(app.build_app(opts), name="hint-two", route_prefix="/two")
    try:
        replicas = serve.get_deployment_handle("HintReplica", app_name="hint-two")
        hits = [[replicas.predict.remote(instruction, inputs[:1]).result()["cache_hit"]
                 for _ in range(3)] for instruction, inputs in tasks]
    finally:
        serve.delete("hint-two")
    assert hits == [[False, True, True]] * len(tasks)


def test_rendezvous_order_moves_only_the_tasks_of_a_removed_replica():
    from hint_platform.serving.routing import replica_order

    tasks = [f"task {i}" for i in range(200)]
    three = {t: replica_order(t, ["a", "b", "c"]) for t in tasks}
    two = {t: replica_order(t, ["a", "b"]) for t in tasks}
    assert {order[0] for order in three.values()} == {"a", "b", "c"}
    assert all(two[t][0] == three[t][0] for t in tasks if three[t][0] != "c")
    assert all(two[t][0] == three[t][1] for t in tasks if three[t][0] == "c")


@pytest.mark.parametrize("route,body,raw,status,reason", [
    ("/v1/predict", None, b"{not json", 400, "not JSON"),
    ("/v1/predict", [1, 2], None, 400, "must be a JSON object"),
    ("/v1/tasks", {}, None, 400, "missing field 'instruction'"),
    ("/v1/predict", {"instruction": "x"}, None, 400, "'inputs' must be a non-empty list"),
    ("/v1/predict", {"inputs": ["a"]}, None, 400, "give 'task_id'"),
    ("/v1/tasks", {"instruction": "   "}, None, 400, "instruction is empty"),
    ("/v1/tasks", {"instruction": "word " * 200}, None, 400, "max_hyper_len=48"),
    ("/v1/predict", {"instruction": "Count.", "inputs": ["a"] * 9}, None, 413, "too many inputs"),
    ("/v1/predict", {"task_id": "0123456789abcdef", "inputs": ["a"]}, None, 404, "unknown task_id"),
    ("/v1/nothing", None, None, 404, "no route"),
])
def test_bad_requests_get_their_4xx_and_the_replica_keeps_serving(served, route, body, raw, status, reason):
    base, _, tasks, _ = served
    got, answer = _call(f"{base}{route}", body, raw=raw, method="POST" if route != "/v1/nothing" else "GET")
    assert got == status and reason in answer["error"], answer
    ok, result = _call(f"{base}/v1/predict", {"instruction": tasks[0][0], "inputs": tasks[0][1][:1]})
    assert ok == 200 and len(result["outputs"]) == 1


def test_hint_predict_equals_model_generate_row_for_row(export, ray_local, tmp_path):
    import mlflow
    import pandas as pd

    from hint_platform.serving.batch import PredictOptions, predict

    out, suite, tasks = export
    rows = [{"instruction": tasks[t][0], "input": tasks[t][1][i], "references": [f"ref {i}"]}
            for t in range(3) for i in range(4)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = f"{{kind: sni, path: {suite.root}/sni, split: synthetic, max_per_task: 2}}"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    summary = predict(PredictOptions(model=str(out), sources=[str(tmp_path / "rows.jsonl"), spec],
                                     output=str(tmp_path / "pred"), tracking_uri=uri, batch_size=3),
                      progress=lambda line: None)
    got = pd.read_parquet(tmp_path / "pred" / "predictions.parquet")
    assert list(got.columns) == ["id", "task", "input", "prediction", "references"]
    assert summary["rows"] == len(got) == 12 + 2 * len(suite.test_tasks)
    # One state per distinct instruction: the file's three instructions are the spec's
    # Definitions (same tokens), so the spec's rows of those tasks hit the actor's cache.
    assert summary["tasks"] == 3 + len(suite.test_tasks)
    assert summary["task_states_generated"] == len(suite.test_tasks)

    predictor = CachedPredictor(out)
    by_id = got.set_index("id")
    for i, row in enumerate(rows):  # the file's rows: their instruction in the model's format
        hyper, model_input = predictor.texts(row["instruction"], row["input"])
        tokens = predictor.model.generate(torch.tensor([predictor.tokenizer.encode(model_input)]),
                                          hyper_input_ids=torch.tensor([predictor.tokenizer.encode(hyper)]))
        assert by_id.loc[f"rows.jsonl:{i}", "prediction"] == predictor.tokenizer.decode(tokens[0].tolist()).strip()
    from pipelines import SourceSpec, iter_records
    records = iter_records([SourceSpec(kind="sni", path=f"{suite.root}/sni", split="synthetic", part="test",
                                       max_per_task=2)], str(out / "tokenizer"), max_hyper_len=MAX_HYPER)
    for r in records:  # the spec's rows: tokenised by the pipeline
        tokens = predictor.model.generate(torch.tensor([r["input_ids"]]), hyper_input_ids=torch.tensor([r["hyper_input_ids"]]))
        assert by_id.loc[f"{r['task']}#{r['example_index']}", "prediction"] == \
            predictor.tokenizer.decode(tokens[0].tolist()).strip()

    metrics = json.loads((tmp_path / "pred" / "metrics.json").read_text())
    assert set(metrics["per_task"]) == set(got["task"])
    assert 0 <= metrics["overall"]["rougeL"] <= 100
    run = mlflow.MlflowClient(tracking_uri=uri).get_run(summary["mlflow_run_id"])
    assert run.data.params["num_beams"] == "1" and run.data.metrics["rows"] == len(got)
    assert run.data.metrics["predict/rougeL"] == metrics["overall"]["rougeL"]


def test_hint_predict_names_a_bad_source_before_starting_ray(export, tmp_path, capsys):
    from hint_platform.cli import main

    out = str(export[0])
    assert main(["predict", out, str(tmp_path / "missing.jsonl"), "--output", str(tmp_path), "--no-mlflow"]) == 2
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert main(["predict", out, "{kind: sni}", "--output", str(tmp_path), "--no-mlflow"]) == 2
    assert "missing key 'path'" in capsys.readouterr().err
    (tmp_path / "rows.jsonl").write_text('{"input": "a"}\n')
    with pytest.raises(Exception, match="missing column"):
        from hint_platform.serving.batch import read_rows
        read_rows([str(tmp_path / "rows.jsonl")], export[0], 64)
