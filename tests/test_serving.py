"""Serving a tiny HINT model for real: the cached predictor against HintModel.generate, and
ONE Ray Serve instance (real HTTP on loopback) deploying a model from a real MLflow registry
(SQLite store) by alias: answers, cache hits, eviction at the bound, mixed-task batches, and a
4xx with its reason for every bad request while the replica keeps serving."""

import asyncio
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from hint_model import HintConfig, HintModel
from hint_model.peft_export import PROVENANCE, instruction_sha256
from hint_platform.errors import UserError
from hint_platform.export import write as write_export
from hint_platform.serving.adapter import base_of
from hint_platform.serving.batching import Batcher
from hint_platform.serving.predictor import CachedPredictor, Generation, split_by_length
from hint_platform.serving.requests import BadRequest
from hint_platform.tracking import registry
from hint_platform.tracking.runs import tracking_uri_scope
from pipelines import train_tokenizer, write_suite
from tests.tiny_decoders import assert_peft_runs_the_task_as_hint, lora_only_llama

REPO = Path(__file__).resolve().parent.parent
MAX_HYPER = 48
REQUEST_TIMEOUT_S = 15.0  # the served app's


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
        hyper, model_input = predictor.reader.texts(instruction, text)
        hyper_ids = torch.tensor([predictor.tokenizer.encode(hyper)])
        ids = torch.tensor([predictor.tokenizer.encode(model_input)])
        tokens = model.generate(ids, hyper_input_ids=hyper_ids)
        assert output == predictor.tokenizer.decode(tokens[0].tolist()).strip()
    predictor.predict(instructions[:3], inputs[:3])
    assert predictor.cache.stats.hits == 3


def test_a_batch_of_short_inputs_and_a_long_one_runs_as_two_forwards_on_the_cpu(export):
    """Padding the short rows to the long one would cost more than a second forward: the batch
    is split by length, and every output is still the model's own for its row."""
    out, _, tasks = export
    predictor = CachedPredictor(out, batch_size=8)
    instruction, inputs = tasks[0]
    long_input = " ".join(inputs * 40)
    rows = [inputs[0], long_input, inputs[1], inputs[2]]
    key, ids = predictor.reader.tokenize(instruction, rows)
    assert len(ids[1]) > 3 * max(len(ids[i]) for i in (0, 2, 3)) + 150
    state, _ = predictor.task_state(key)
    got = predictor.generate([(state, row, predictor.default) for row in ids])
    assert (predictor.batches, predictor.rows) == (2, 4)
    hyper_ids = torch.tensor([key])
    for row, output in zip(ids, got):
        tokens = predictor.model.generate(torch.tensor([row]), hyper_input_ids=hyper_ids)
        assert output == predictor.tokenizer.decode(tokens[0].tolist()).strip()
    assert predictor.generate_seconds > 0 and predictor.state_seconds > 0


def test_split_by_length_is_the_least_cost_grouping():
    """Against every grouping of a few rows (a forward costs 100 + rows x its longest)."""
    import itertools
    import random

    def cost(groups, lengths):
        return sum(100 + len(g) * max(lengths[i] for i in g) for g in groups)

    def groupings(rows):
        if not rows:
            yield []
            return
        first, rest = rows[0], rows[1:]
        for k in range(len(rest) + 1):
            for mates in itertools.combinations(rest, k):
                for tail in groupings([r for r in rest if r not in mates]):
                    yield [[first, *mates], *tail]

    rng = random.Random(0)
    for _ in range(30):
        lengths = [rng.choice([3, 8, 40, 90, 300, 600]) for _ in range(rng.randint(1, 6))]
        groups = split_by_length(lengths, 100, max_rows=4)
        assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
        assert all(len(g) <= 4 for g in groups)
        best = min(cost(g, lengths) for g in groupings(list(range(len(lengths)))) if all(len(x) <= 4 for x in g))
        assert cost(groups, lengths) == best
    assert split_by_length([5, 7, 6], 100, max_rows=16) == [[0, 2, 1]]  # similar lengths: one forward


def test_rows_that_come_while_the_model_runs_share_its_next_forward():
    """Serve's @serve.batch cut a batch `wait` after its first row even while the model still ran
    the last one: under load every forward ran one row. The Batcher cuts the next batch when the
    model is free: every row that came meanwhile (up to max_batch_size), cancelled ones left out,
    and the model's exception is the answer of each row of its batch."""
    batches, model_runs, release = [], threading.Event(), threading.Event()

    def run(rows):
        batches.append(rows)
        model_runs.set()
        release.wait()  # the first forward lasts until every later row has come
        if -1 in rows:
            raise ValueError("the model failed")
        return [10 * row for row in rows]

    async def requests():
        batcher = Batcher(run, ThreadPoolExecutor(max_workers=1), max_batch_size=3, wait_s=0.01)
        first = asyncio.ensure_future(batcher(0))
        await asyncio.to_thread(model_runs.wait)
        later = []
        for row in (1, 2, 3, 4, 5):
            later.append(asyncio.ensure_future(batcher(row)))
            await asyncio.sleep(0.03)  # longer than the wait: @serve.batch cut a batch of each
        later[1].cancel()
        release.set()
        answers = await asyncio.gather(first, *later, return_exceptions=True)
        failed = await asyncio.gather(batcher(7), batcher(-1), return_exceptions=True)
        return answers, failed

    answers, failed = asyncio.run(requests())
    assert batches[:3] == [[0], [1, 3, 4], [5]]
    assert answers[:2] == [0, 10] and isinstance(answers[2], asyncio.CancelledError) and answers[3:] == [30, 40, 50]
    assert batches[3:] == [[7, -1]] and all(isinstance(e, ValueError) for e in failed)


def test_a_short_answer_fails_its_batch_and_a_cancelled_batcher_leaves_no_row_waiting():
    """A model that answers fewer rows than it was given fails each row of the batch (zip would
    have left the last ones waiting forever); a batcher whose task is cancelled (the replica's
    loop closing) cancels the rows it runs and the rows still waiting."""
    model_runs, release = threading.Event(), threading.Event()

    def run(rows):
        if rows == [1, 2]:
            return [10]
        model_runs.set()
        release.wait()
        return rows

    async def requests():
        batcher = Batcher(run, ThreadPoolExecutor(max_workers=1), max_batch_size=2, wait_s=0.01)
        short = await asyncio.wait_for(asyncio.gather(batcher(1), batcher(2), return_exceptions=True), 5)
        running = asyncio.ensure_future(batcher(3))
        await asyncio.to_thread(model_runs.wait)
        waiting = asyncio.ensure_future(batcher(4))
        await asyncio.sleep(0)
        batcher._worker.cancel()
        left = await asyncio.wait_for(asyncio.gather(running, waiting, return_exceptions=True), 5)
        release.set()
        return short, left

    short, left = asyncio.run(requests())
    assert all(isinstance(e, RuntimeError) and "answered 1 rows of a batch of 2" in str(e) for e in short)
    assert all(isinstance(e, asyncio.CancelledError) for e in left)


def test_predictor_in_bf16_equals_the_bf16_model_and_caches_the_longest_instruction(export):
    out, _, tasks = export
    predictor = CachedPredictor(out, dtype="bfloat16", batch_size=4)
    assert next(predictor.model.parameters()).dtype == torch.bfloat16 and predictor.device.type == "cpu"
    instruction, inputs = tasks[0][0], tasks[0][1][:3]
    hyper, _ = predictor.reader.texts(instruction, "")
    hyper_ids = torch.tensor([predictor.tokenizer.encode(hyper)])
    for text, output in zip(inputs, predictor.predict([instruction] * 3, inputs)):
        ids = torch.tensor([predictor.tokenizer.encode(predictor.reader.texts(instruction, text)[1])])
        tokens = predictor.model.generate(ids, hyper_input_ids=hyper_ids)
        assert output == predictor.tokenizer.decode(tokens[0].tolist()).strip()
    longest = tuple(range(5, 5 + MAX_HYPER))  # the default bound is sized to hold it
    state, hit = predictor.task_state(longest)
    assert not hit and longest in predictor.cache and predictor.cache.stats.capacity_bytes >= state.nbytes


def test_cache_evicts_least_recently_used_at_its_bound(export):
    out, _, tasks = export
    probe = CachedPredictor(out)
    sizes = [probe.task_state(probe.reader.task_key(t[0]))[0].nbytes for t in tasks[:3]]
    predictor = CachedPredictor(out, cache_mib=(sizes[0] + sizes[1]) / 2**20)
    keys = [predictor.reader.task_key(t[0]) for t in tasks[:3]]
    for key in (keys[0], keys[1], keys[0], keys[2]):
        predictor.cache.release(predictor.task_state(key)[0])
    stats = predictor.cache.stats
    assert (stats.hits, stats.misses, stats.evictions) == (1, 3, 1)
    assert keys[1] not in predictor.cache and keys[0] in predictor.cache and keys[2] in predictor.cache
    assert stats.bytes <= stats.capacity_bytes


def test_cache_counts_the_states_requests_hold_and_the_stacked_copies(export):
    """Memory is bounded by what is counted: a state a request holds is never evicted and
    counts against the bound (a new state is kept only beside it), and a mixed batch's stacked
    copy counts while it lives."""
    out, _, tasks = export
    probe = CachedPredictor(out)
    sizes = [probe.task_state(probe.reader.task_key(t[0]))[0].nbytes for t in tasks[:3]]
    predictor = CachedPredictor(out, cache_mib=(sizes[0] + sizes[1]) / 2**20)
    cache, stats = predictor.cache, predictor.cache.stats
    keys = [predictor.reader.task_key(t[0]) for t in tasks[:3]]
    held = [predictor.task_state(key)[0] for key in keys]  # three requests in flight at once
    assert keys[0] in cache and keys[1] in cache and keys[2] not in cache
    assert (stats.bytes, stats.in_flight_bytes, stats.evictions) == (sizes[0] + sizes[1], sizes[2], 0)
    assert stats.peak_bytes == sum(sizes)
    for state in held:
        cache.release(state)
    assert stats.in_flight_bytes == 0 and stats.total_bytes <= stats.capacity_bytes

    stats.peak_bytes = 0
    predictor.predict([tasks[0][0], tasks[1][0]], [tasks[0][1][0], tasks[1][1][0]])  # one mixed batch
    assert predictor.mixed_batches == 1 and stats.stacked_bytes == 0
    assert stats.peak_bytes >= 2 * (sizes[0] + sizes[1])  # both states kept, and their stacked copy
    assert stats.total_bytes <= stats.capacity_bytes


def test_generation_arguments_within_the_bounds_or_refused(export):
    predictor = CachedPredictor(export[0], num_beams=2)
    assert predictor.generation() == predictor.default == Generation(6, 2)
    assert predictor.generation(max_new_tokens=2, num_beams=1) == Generation(2, 1)
    for asked, reason in [({"max_new_tokens": 7}, "'max_new_tokens' must be an integer from 1 to 6"),
                          ({"max_new_tokens": 0}, "from 1 to 6"), ({"num_beams": 3}, "'num_beams' must be"),
                          ({"num_beams": True}, "got true"), ({"max_new_tokens": "5"}, "got \"5\"")]:
        with pytest.raises(BadRequest, match=reason):
            predictor.generation(**asked)
    with pytest.raises(UserError, match="num_beams must be >= 1, got 0"):
        CachedPredictor(export[0], num_beams=0)


def test_task_ids_are_bounded_in_bytes_as_well_as_in_number():
    from hint_platform.serving.app import TaskIds

    ids = TaskIds(max_entries=1000, max_bytes=10_000)
    first = ids.add("a" * 4000)
    second = ids.add("b" * 4000)
    assert ids.get(first) == "a" * 4000  # now the most recently used
    ids.add("c" * 4000)
    assert second not in ids and first in ids and len(ids) == 2 and ids.bytes == 8000
    assert ids.get(ids.add("d" * 50_000)) == "d" * 50_000 and len(ids) == 1  # one larger than the bound stays


def test_the_latency_metric_tags_unknown_paths_as_other():
    from hint_platform.serving.app import route_tag

    assert route_tag("/v1/predict") == "/v1/predict" and route_tag("/v1/health") == "/v1/health"
    assert {route_tag(f"/random/{i}") for i in range(100)} == {"other"}
    assert {route_tag(f"/v1/tasks/{i:016x}/adapter") for i in range(100)} == {"/v1/tasks/{task_id}/adapter"}


def test_bad_instructions_are_refused_with_the_reason(export):
    predictor = CachedPredictor(export[0])
    with pytest.raises(BadRequest, match="instruction is empty"):
        predictor.reader.task_key("  ")
    with pytest.raises(BadRequest, match=f"more than the model's max_hyper_len={MAX_HYPER}"):
        predictor.reader.task_key("word " * 200)
    with pytest.raises(BadRequest, match="instruction is not well-formed Unicode: a lone surrogate at character 5"):
        predictor.reader.task_key("Count\ud800 the words.")
    with pytest.raises(BadRequest, match="input is not well-formed Unicode"):
        predictor.reader.input_ids("Count the words.", "\udfff")


# ---- one Ray Serve instance for the rest of the module ----

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(url: str, body=None, method: str | None = None, raw: bytes | None = None,
          timeout: float = 120) -> tuple[int, dict]:
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    request = urllib.request.Request(url, data=data, method=method or ("POST" if data is not None else "GET"),
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
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
    size = max(probe.task_state(probe.reader.task_key(t[0]))[0].nbytes for t in tasks)
    opts = app.ServeOptions(model="models:/hint-serve-test@champion", tracking_uri=uri, replicas=1,
                            cache_mib=2.5 * size / 2**20, max_inputs=8, max_batch_size=8,
                            batch_wait_ms=200.0, replica_cpus=0.5, max_chars=4000, max_body_kib=64,
                            request_timeout_s=REQUEST_TIMEOUT_S)
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


@pytest.fixture(scope="module")
def lora_app(served, export, tmp_path_factory):
    """A second application on the same Serve, at /lora: a lora_only Llama export, whose tasks
    are PEFT adapters."""
    from ray import serve

    from hint_platform.serving import app

    out, base = lora_only_llama(export[1].texts(), tmp_path_factory.mktemp("lora"), max_hyper_len=256)
    opts = app.ServeOptions(model=str(out), replicas=1, replica_cpus=0.5,
                            request_timeout_s=REQUEST_TIMEOUT_S)
    serve.run(app.build_app(opts), name="hint-lora", route_prefix="/lora")
    try:
        yield f"{served[0]}/lora", out, base
    finally:
        serve.delete("hint-lora")


def _get(url: str) -> tuple[int, dict, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_a_tasks_adapter_is_an_archive_that_peft_loads_as_the_model_runs_the_task(served, lora_app, tmp_path):
    url, out, base = lora_app
    instruction = served[2][0][0]
    status, created = _call(f"{url}/v1/tasks", {"instruction": instruction})
    assert status == 200, created
    task_id = created["task_id"]
    _, before = _call(f"{url}/v1/stats")
    status, headers, data = _get(f"{url}/v1/tasks/{task_id}/adapter")
    assert status == 200, data[:300]
    assert headers["content-type"] == "application/gzip"
    assert headers["content-disposition"] == f'attachment; filename="task-{task_id}.tar.gz"'
    _, after = _call(f"{url}/v1/stats")
    assert (after["hits"], after["misses"]) == (before["hits"] + 1, before["misses"])  # the kept state

    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        assert sorted(tar.getnames()) == [f"task-{task_id}"] + [
            f"task-{task_id}/{name}" for name in ("adapter_config.json", "adapter_model.safetensors", PROVENANCE)]
        tar.extractall(tmp_path, filter="data")
    adapter = tmp_path / f"task-{task_id}"
    provenance = json.loads((adapter / PROVENANCE).read_text())
    assert provenance["instruction_sha256"][:16] == task_id == instruction_sha256(instruction)[:16]
    assert provenance["model"] == str(out)
    # the base the export was built from (a local directory: its path), as no --adapter-base says otherwise
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(base)
    assert_peft_runs_the_task_as_hint(out, base, adapter, instruction)


def test_an_adapter_names_the_base_the_model_was_built_from_unless_the_server_names_one():
    built = HintConfig.preset("llama-tiny", variant="lora_only", base_model_name_or_path="org/tiny",
                              base_revision="0123abcd")
    assert base_of(built) == ("org/tiny", "0123abcd")
    assert base_of(built, "/models/tiny") == ("/models/tiny", None)  # hint serve --adapter-base
    assert base_of(HintConfig.preset("llama-tiny", variant="lora_only")) == (None, None)  # from scratch


def test_the_adapter_route_refuses_unknown_tasks_and_models_that_are_no_lora(served, lora_app):
    base = served[0]
    status, created = _call(f"{base}/v1/tasks", {"instruction": served[2][0][0]})
    assert status == 200
    status, _, body = _get(f"{base}/v1/tasks/{created['task_id']}/adapter")  # the T5 HINT app
    assert status == 409 and "a t5 model has no causal-LM PEFT adapter" in json.loads(body)["error"]
    status, _, body = _get(f"{lora_app[0]}/v1/tasks/0123456789abcdef/adapter")
    assert status == 404 and "unknown task_id '0123456789abcdef'" in json.loads(body)["error"]
    status, answer = _call(f"{lora_app[0]}/v1/tasks/0123456789abcdef/adapter", {})
    assert status == 405 and "takes GET, not 'POST'" in answer["error"]


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


def test_the_start_up_line_says_when_a_state_at_the_longest_instruction_does_not_fit(served):
    """`hint serve` prints its replicas' bound (their log does not reach its console)."""
    from hint_platform.serving import app

    _, probe, _, _ = served
    stats = app.replica_stats(app.DEFAULT_NAME)
    longest = probe.task_state(tuple(range(5, 5 + MAX_HYPER)))[0]
    assert stats["longest_state_bytes"] == longest.nbytes and stats["max_hyper_len"] == MAX_HYPER
    mib = stats["capacity_bytes"] / 2**20
    assert app.cache_summary(stats) == f"task-state cache {mib:.0f} MiB a replica"
    small = app.cache_summary({**stats, "capacity_bytes": longest.nbytes - 1})
    assert small.endswith(f"less than one task state at the longest instruction ({MAX_HYPER} tokens, "
                          f"{longest.nbytes / 2**20:.0f} MiB): long instructions will not be cached")


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
    """Two replicas (a second `hint serve` application on the same cluster, `--name hint-two`;
    called through the replicas' own handle, so through TaskAffinityRouter): after its first
    request, every request of a task finds its state cached. Serve's default routing picks
    replicas at random: about half of these would miss (all 8 hit with probability 2**-8).
    The second application answers under /hint-two, a third of that name is refused, and
    stopping it leaves the first one serving."""
    from ray import serve

    from hint_platform.serving import app

    base, probe, tasks, uri = served
    opts = app.ServeOptions(model="models:/hint-serve-test@champion", name="hint-two", tracking_uri=uri,
                            replicas=2, replica_cpus=0.5)
    two = app.run(opts, port=int(base.rsplit(":", 1)[1]))
    try:
        assert two == f"{base}/hint-two"
        replicas = serve.get_deployment_handle("HintReplica", app_name="hint-two")
        hits = [[replicas.predict.remote(instruction, inputs[:1]).result()["cache_hit"]
                 for _ in range(3)] for instruction, inputs in tasks]
        status, answer = _call(f"{two}/v1/predict", {"instruction": tasks[0][0], "inputs": tasks[0][1][:1]})
        assert status == 200 and answer["cache_hit"] is True, answer
        with pytest.raises(UserError, match="'hint-two' is served on this Ray cluster already: give this one"):
            app.run(opts, port=int(base.rsplit(":", 1)[1]))
    finally:
        app.stop("hint-two", own_cluster=True)  # the module's "hint" is left: Serve stays up
    assert hits == [[False, True, True]] * len(tasks)
    assert "hint-two" not in serve.status().applications and "hint" in serve.status().applications
    assert _call(f"{base}/v1/health") == (200, {"status": "ok"})


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
    # hostile: malformed Unicode (JSON escapes of lone surrogates), deep JSON, oversized text and
    # bodies, fields the API does not know, generation arguments beyond the server's
    ("/v1/predict", None, b'{"instruction": "Count\\ud800", "inputs": ["a"]}', 400,
     "field 'instruction' is not well-formed Unicode: a lone surrogate at character 5"),
    ("/v1/predict", None, b'{"instruction": "Count.", "inputs": ["a", "\\udfff"]}', 400,
     "inputs[1] is not well-formed Unicode"),
    ("/v1/tasks", None, b'{"instruction": "\\udc00\\ud800"}', 400, "not well-formed Unicode"),
    ("/v1/predict", None, b"[" * 50_000, 400, "nested too deeply"),
    ("/v1/predict", None, b'{"instruction": ' + b"{\"a\": " * 10_000, 400, "nested too deeply"),
    ("/v1/predict", {"instruction": "a" * 4001, "inputs": ["a"]}, None, 413,
     "field 'instruction' has 4001 characters, more than 4000 (--max-chars)"),
    ("/v1/predict", {"instruction": "Count.", "inputs": ["a", "b" * 4001]}, None, 413, "inputs[1] has 4001"),
    ("/v1/predict", None, b'{"instruction": "Count.", "inputs": ["a"]' + b" " * 65536 + b"}", 413,
     "request body of 65578 bytes, more than 65536 (--max-body-kib)"),
    ("/v1/predict", {"instruction": "Count.", "inputs": ["a"], "max_tokens": 3}, None, 400,
     "unknown field 'max_tokens'; /v1/predict takes: task_id, instruction, inputs, max_new_tokens, num_beams"),
    ("/v1/tasks", {"instruction": "Count.", "inputs": ["a"]}, None, 400, "unknown field 'inputs'"),
    ("/v1/predict", {"instruction": "Count.", "inputs": ["a"], "max_new_tokens": 7}, None, 400,
     "field 'max_new_tokens' must be an integer from 1 to 6 (this server's bound), got 7"),
    ("/v1/predict", {"instruction": "Count.", "inputs": ["a"], "max_new_tokens": "3"}, None, 400,
     "field 'max_new_tokens' must be an integer"),
    ("/v1/predict", {"instruction": "Count.", "inputs": ["a"], "num_beams": 2}, None, 400,
     "field 'num_beams' must be an integer from 1 to 1"),
])
def test_bad_requests_get_their_4xx_and_the_replica_keeps_serving(served, route, body, raw, status, reason):
    base, _, tasks, _ = served
    got, answer = _call(f"{base}{route}", body, raw=raw, method="POST" if route != "/v1/nothing" else "GET",
                        timeout=30)
    assert got == status and reason in answer["error"], answer
    assert "Traceback" not in answer["error"] and len(answer["error"]) < 300  # the reason, not a remote traceback
    ok, result = _call(f"{base}/v1/predict", {"instruction": tasks[0][0], "inputs": tasks[0][1][:1]}, timeout=30)
    assert ok == 200 and len(result["outputs"]) == 1


def _post_raw(base: str, headers: dict, chunks=(), timeout: float = 30) -> tuple[int, dict]:
    """POST /v1/predict with the given headers and `chunks` (chunked if the headers say so), and
    no more of the body: (status, answer)."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout)
    try:
        conn.putrequest("POST", "/v1/predict")
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        chunked = headers.get("Transfer-Encoding") == "chunked"
        try:
            for chunk in chunks:
                conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
        except (BrokenPipeError, ConnectionResetError):  # the server answered and closed early
            pass
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


def test_a_body_over_the_bound_is_refused_before_it_is_read(served):
    base = served[0]
    start = time.monotonic()  # a Content-Length of 1 GB, and no body: refused on the header
    assert _post_raw(base, {"Content-Length": str(10**9)}, [b'{"inputs": ']) == \
        (413, {"error": "request body of 1000000000 bytes, more than 65536 (--max-body-kib)"})
    assert time.monotonic() - start < 10
    # no Content-Length: chunks of a valid JSON body, refused as they stream past the bound
    chunks = [b'{"instruction": "'] + [b"a" * 8192] * 16 + [b'", "inputs": ["a"]}']
    status, answer = _post_raw(base, {"Transfer-Encoding": "chunked"}, chunks)
    assert (status, answer["error"]) == (413, "request body of more than 65536 bytes (--max-body-kib)")


def test_a_malformed_instruction_through_the_replicas_handle_is_refused_not_hung(served):
    """The replica's own handle, so the request router sees the instruction first: it must
    route it (never raise: Serve would never resolve the request) and the replica refuse it."""
    from ray import serve

    replicas = serve.get_deployment_handle("HintReplica", app_name="hint")
    with pytest.raises(BadRequest, match="instruction is not well-formed Unicode"):
        replicas.predict.remote("Count\ud800", ["a"]).result(timeout_s=30)
    tasks = served[2]
    assert replicas.predict.remote(tasks[0][0], tasks[0][1][:1]).result(timeout_s=30)["outputs"]


def test_the_router_falls_back_to_every_replica_when_ranking_fails():
    from types import SimpleNamespace

    from hint_platform.serving.routing import TaskAffinityRouter

    class Unformattable(str):
        def __format__(self, spec):
            raise RuntimeError("no")

    replicas = [SimpleNamespace(replica_id=SimpleNamespace(unique_id=i)) for i in "abc"]
    router = TaskAffinityRouter.__new__(TaskAffinityRouter)  # choose_replicas reads no router state
    ranked = asyncio.run(router.choose_replicas(replicas, SimpleNamespace(args=["Count.\ud800"])))
    assert sorted(r[0].replica_id.unique_id for r in ranked) == ["a", "b", "c"]
    assert asyncio.run(router.choose_replicas(replicas, SimpleNamespace(args=[Unformattable("x")]))) == [replicas]


def test_a_flood_of_bad_and_stalled_requests_leaves_health_and_valid_requests_answering(served):
    """Far more bad requests than Serve's default of 5 a replica, and clients that send half a
    body and stall: each gets its 4xx (the stalled ones a 408 at the request timeout), while
    health and a valid request keep answering within a bound."""
    base, probe, tasks, _ = served
    bad = b'{"instruction": "Count\\ud800", "inputs": ["a"]}'
    begin = time.monotonic()
    with ThreadPoolExecutor(max_workers=48) as pool:
        stalled = [pool.submit(_post_raw, base, {"Content-Length": "100"}, [b'{"inputs": '], 90) for _ in range(8)]
        malformed = [pool.submit(_call, f"{base}/v1/predict", raw=bad, timeout=30) for _ in range(40)]
        time.sleep(1.0)
        health = []
        for _ in range(5):
            start = time.monotonic()
            health.append((_call(f"{base}/v1/health", timeout=10), time.monotonic() - start))
        start = time.monotonic()
        valid = _call(f"{base}/v1/predict", {"instruction": tasks[1][0], "inputs": tasks[1][1][:1]}, timeout=30)
        valid_s = time.monotonic() - start
        assert all(answer == (200, {"status": "ok"}) and took < 5 for answer, took in health), health
        assert valid[0] == 200 and valid[1]["outputs"] == probe.predict([tasks[1][0]], tasks[1][1][:1])
        assert valid_s < 20
        assert {f.result()[0] for f in malformed} == {400}
        stalled_status = [f.result() for f in stalled]
    assert {status for status, _ in stalled_status} == {408}, stalled_status
    assert "waiting for the request body" in stalled_status[0][1]["error"]
    assert time.monotonic() - begin < REQUEST_TIMEOUT_S + 10


def test_stopping_on_a_shared_cluster_deletes_only_our_application(served):
    """Runs last of the Serve tests: it deletes the module's application."""
    from ray import serve

    from hint_platform.serving import app

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class Other:
        async def __call__(self, request) -> str:
            return "other"

    serve.run(Other.bind(), name="someone-else", route_prefix="/someone-else")
    left = set(serve.status().applications) - {app.DEFAULT_NAME}  # the module's others stay too
    app.stop(app.DEFAULT_NAME, own_cluster=False)
    assert set(serve.status().applications) == left and "someone-else" in left
    assert urllib.request.urlopen(f"{served[0]}/someone-else", timeout=30).read() == b"other"


def test_hint_serve_refuses_bad_generation_bounds_before_starting_anything(export, tmp_path):
    from hint_platform.serving.app import ServeOptions

    done = subprocess.run([sys.executable, "-m", "hint_platform.cli", "serve", str(export[0]), "--num-beams", "0"],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == ["hint serve: error: --num-beams must be >= 1, got 0"]
    with pytest.raises(UserError, match="--max-new-tokens must be >= 1, got -1"):
        ServeOptions(model="x", max_new_tokens=-1)
    with pytest.raises(UserError, match="--request-timeout-s must be > 0"):
        ServeOptions(model="x", request_timeout_s=0)
    with pytest.raises(UserError, match="--name 'a/b' is not a valid name"):
        ServeOptions(model="x", name="a/b")
    with pytest.raises(UserError, match="--name v1 would take the routes"):
        ServeOptions(model="x", name="v1")


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
    (tmp_path / "pred").mkdir()
    (tmp_path / "pred" / "old-run.parquet").write_text("an earlier job's file")
    secret = "pw-of-the-warehouse-0123"
    summary = predict(PredictOptions(model=str(out), sources=[str(tmp_path / "rows.jsonl"), spec],
                                     output=str(tmp_path / "pred"), tracking_uri=uri, batch_size=3,
                                     params={"source_db": f"postgresql://etl:{secret}@db:5432/rows"}),
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
        hyper, model_input = predictor.reader.texts(row["instruction"], row["input"])
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
    client = mlflow.MlflowClient(tracking_uri=uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.data.params["num_beams"] == "1" and run.data.metrics["rows"] == len(got)
    assert secret not in json.dumps(run.data.params) and "etl:***@db" in run.data.params["source_db"]
    logged = {f.path for f in client.list_artifacts(run.info.run_id, "predict")}
    assert logged == {"predict/predictions.parquet", "predict/metrics.json"}  # not the old run's file
    assert sorted(p.name for p in (tmp_path / "pred").iterdir()) == [
        "metrics.json", "old-run.parquet", "predictions.parquet", "summary.json"]  # no work dir left
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


def test_hint_predict_checks_every_row_before_any_model_work(export, tmp_path):
    from hint_platform.errors import UserError
    from hint_platform.serving.batch import PredictOptions, predict

    out, _, tasks = export
    rows = [{"id": "fine", "instruction": tasks[0][0], "input": "x"},
            {"id": "long-one", "instruction": "word " * 200, "input": "x"}]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = PredictOptions(model=str(out), sources=[str(tmp_path / "rows.jsonl")], output=str(tmp_path / "pred"))
    with pytest.raises(UserError, match=f"row long-one: instruction has .* tokens, more than the model's "
                                        f"max_hyper_len={MAX_HYPER}"):
        predict(opts, log_run=False)  # no Ray call before this: the check runs on the driver
    (tmp_path / "rows.jsonl").write_text(json.dumps({"instruction": " ", "input": "x"}) + "\n")
    with pytest.raises(UserError, match="rows.jsonl: row 0: empty instruction"):
        predict(opts, log_run=False)
    assert not (tmp_path / "pred").exists()


def test_hint_predict_killed_actor_then_the_rerun_resumes_with_every_row_once(export, ray_local, tmp_path):
    """A real actor process SIGKILLed mid-job (its PID from Ray's GCS actor table): with
    max_restarts=0 the job fails instead of retrying; the parts written stay; the same command
    again predicts only the missing rows and publishes each row exactly once."""
    import os
    import signal
    import threading
    import time

    import pandas as pd
    import ray._private.state as ray_state

    from hint_platform.serving import batch_output
    from hint_platform.serving.batch import PredictOptions, predict, read_rows

    out, _, tasks = export
    rows = [{"id": f"r{i}", "instruction": tasks[i % 4][0], "input": f"{tasks[i % 4][1][i % 6]} {i}"}
            for i in range(96)]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    opts = PredictOptions(model=str(out), sources=[str(tmp_path / "rows.jsonl")], output=str(tmp_path / "pred"),
                          batch_size=1, num_beams=2, max_new_tokens=24, max_restarts=0, max_task_retries=0)
    rows_table = read_rows(opts.sources, out, opts.max_input_len)
    work = batch_output.work_dir((tmp_path / "pred").resolve(), batch_output.fingerprint(opts.job(rows_table)))
    killed: list[int] = []
    ended = threading.Event()

    def kill_an_actor_mid_job():
        while not ended.is_set() and not (work.is_dir() and batch_output.parts(work)):
            time.sleep(0.02)
        for actor in ray_state.actors().values():
            if "PredictActor" in actor["ActorClassName"] and actor["State"] == "ALIVE":
                os.kill(actor["Pid"], signal.SIGKILL)
                killed.append(len(batch_output.parts(work)))

    killer = threading.Thread(target=kill_an_actor_mid_job)
    killer.start()
    try:
        with pytest.raises(Exception):  # noqa: B017 (Ray Data wraps the actor's death in its own errors)
            predict(opts, log_run=False, progress=lambda line: None)
    finally:
        ended.set()
        killer.join()
    assert killed and 0 < killed[0] < 96 // 4
    written = batch_output.written_ids(work)
    assert 0 < len(written) < len(rows) and not (tmp_path / "pred" / "predictions.parquet").exists()

    summary = predict(opts, log_run=False, progress=lambda line: None)
    assert summary["resumed_rows"] == len(written) and summary["rows"] == len(rows)
    got = pd.read_parquet(tmp_path / "pred" / "predictions.parquet")
    assert sorted(got["id"]) == sorted(r["id"] for r in rows)  # every row, each once
    assert not work.exists()
    again = predict(opts, log_run=False, progress=lambda line: None)  # done: nothing to redo
    assert again["job"] == summary["job"] and len(pd.read_parquet(tmp_path / "pred" / "predictions.parquet")) == len(rows)
