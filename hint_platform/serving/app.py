"""`hint serve`: a HINT model behind Ray Serve.

Two deployments. `HintIngress` (one replica, no model) speaks HTTP: it checks each request,
keeps the task ids it handed out (task_id -> instruction) and answers 4xx with the reason for
a bad one. `HintReplica` (N replicas) holds the model and a CachedPredictor whose LRU cache
of task states is bounded in MiB; its model thread runs the inputs of concurrent requests, of
any tasks, as one mixed-task forward: every input that waited while the model ran the last one
(serving/batching.py). With several replicas a task's requests go
to the replica that holds its state (serving/routing.py). The application is named
(`--name`, default "hint"): two `hint serve` on one cluster need two names, and another name
than the default answers under /NAME (its routes below that prefix).

  POST /v1/tasks    {"instruction": str}                       -> {"task_id"}
  POST /v1/predict  {"task_id" | "instruction", "inputs": [str], "max_new_tokens"?, "num_beams"?}
                    -> {"outputs", "task_id", "cache_hit"}
  GET  /v1/tasks/{task_id}/adapter -> the task's LoRA as a PEFT adapter, a tar.gz (409 for a
                    model whose tasks are not a plain LoRA; serving/adapter.py)
  GET  /v1/health   -> {"status": "ok"};   GET /v1/stats -> one replica's cache counters

Hostile input gets its 4xx before any model work: the body is capped before it is read, text
must be well-formed Unicode of at most `max_chars` characters, unknown fields are refused,
generation arguments stay within the server's. Load is bounded by Serve's own limits, set here
explicitly (Serve's default of 5 requests a replica would block every route, health included,
behind five slow ones): `max_ongoing_requests` per model replica, `max_queued_requests` waiting
for one (more: 503), and `request_timeout_s` for the whole request (504 from the ingress; the
proxy's own timeout, a little later, is the backstop).

Metrics (Prometheus, via ray.serve.metrics): hint_task_cache_{hits,misses,evictions}
counters, hint_task_cache_bytes gauge (per replica: every task state in memory, kept, held by
requests or stacked), hint_request_latency_ms histogram (per route, "other" for unknown paths,
and status).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from ray import serve
from ray.serve import metrics
from ray.serve.config import RequestRouterConfig
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from hint_model import TaskModules
from hint_platform.errors import UserError
from hint_platform.serving import adapter
from hint_platform.serving.batching import Batcher
from hint_platform.serving.predictor import CachedPredictor
from hint_platform.serving.requests import BadRequest, check_text
from hint_platform.serving.routing import TaskAffinityRouter
from hint_platform.tracking.registry import model_source, resolve_export

DEFAULT_NAME = "hint"  # served at the root; any other name under /NAME
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,62}")  # a Serve application name and a URL path segment
ROUTES = {"/v1/health": "GET", "/v1/stats": "GET", "/v1/tasks": "POST", "/v1/predict": "POST"}
ADAPTER_ROUTE = "/v1/tasks/{task_id}/adapter"
ADAPTER_PATH = re.compile(r"/v1/tasks/([^/]*)/adapter")
ROUTES_ROOT = "v1"  # no application name: Serve would send a root application's routes to it
FIELDS = {"/v1/tasks": ("instruction",),
          "/v1/predict": ("task_id", "instruction", "inputs", "max_new_tokens", "num_beams")}
INGRESS_HEADROOM = 64  # ingress requests beyond what the replicas take: health, stats, 4xx answers
PROXY_GRACE_S = 5.0  # the proxy times out this much after the ingress, which says why in JSON

logger = logging.getLogger("ray.serve")


@dataclass
class ServeOptions:
    """What `hint serve` configures; travels to the replicas as plain values."""

    model: str
    name: str = DEFAULT_NAME
    tracking_uri: str | None = None
    replicas: int = 1
    cache_mib: float | None = None  # None: placement.default_cache_bytes (from the model and device)
    max_new_tokens: int | None = None  # None: the model's target length; a request may ask for fewer
    num_beams: int = 1  # a request may ask for fewer
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    max_inputs: int = 64  # per /v1/predict request
    max_chars: int = 32_768  # per text field (an instruction, an input)
    max_body_kib: int = 4096  # per request body
    max_ongoing_requests: int = 32  # per model replica: what its batches draw from
    max_queued_requests: int = 256  # waiting for a model replica; beyond: 503
    request_timeout_s: float = 60.0
    max_adapter_mib: float = 256.0  # per GET /v1/tasks/{task_id}/adapter answer (its tensors)
    adapter_base: str | None = None  # the adapters' base_model_name_or_path (None: adapter.base_of's)
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0

    def __post_init__(self):
        """Refuse values every request would then fail on, naming the `hint serve` option."""
        at_least = {"replicas": 1, "cache_mib": 0, "max_new_tokens": 1, "num_beams": 1, "max_batch_size": 1,
                    "batch_wait_ms": 0, "max_inputs": 1, "max_chars": 1, "max_body_kib": 1,
                    "max_ongoing_requests": 1, "max_queued_requests": 0, "max_adapter_mib": 0,
                    "replica_cpus": 0, "replica_gpus": 0}
        for name, low in at_least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise UserError(f"--{name.replace('_', '-')} must be >= {low}, got {value:g}")
        if not self.request_timeout_s > 0:
            raise UserError(f"--request-timeout-s must be > 0, got {self.request_timeout_s:g}")
        if not isinstance(self.name, str) or not NAME.fullmatch(self.name):
            raise UserError(f"--name {self.name!r} is not a valid name: use 1 to 63 letters, digits, '_' or '-', "
                            "starting with a letter or digit")
        if self.name == ROUTES_ROOT:
            raise UserError(f"--name {ROUTES_ROOT} would take the routes (/{ROUTES_ROOT}/...) of a hint serve at the root")

    @property
    def route_prefix(self) -> str:
        return "/" if self.name == DEFAULT_NAME else f"/{self.name}"


class NameTaken(UserError):
    """Another application of this name is served on the cluster (it is left alone)."""


class HttpError(Exception):
    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


@serve.deployment
class HintReplica:
    def __init__(self, options: dict):
        opts = ServeOptions(**options)
        # models:/NAME@ALIAS: the logged export's weights and config only, never its code.
        self.predictor = CachedPredictor(resolve_export(opts.model, opts.tracking_uri), cache_mib=opts.cache_mib,
                                         max_new_tokens=opts.max_new_tokens, num_beams=opts.num_beams,
                                         batch_size=opts.max_batch_size)
        self.max_adapter_bytes = int(opts.max_adapter_mib * 2**20)
        self.base, revision = adapter.base_of(self.predictor.model.config, opts.adapter_base)
        # an adapter's provenance
        self.source = {**model_source(opts.model, opts.tracking_uri), "base_revision": revision}
        # One thread runs the model, another tokenises: the event loop only gathers requests
        # into batches, so it keeps taking them while the model runs.
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._text_pool = ThreadPoolExecutor(max_workers=1)
        self._batcher = Batcher(self.predictor.generate, self._pool, opts.max_batch_size, opts.batch_wait_ms / 1000)
        self._hits = metrics.Counter("hint_task_cache_hits", description="task states served from the cache")
        self._misses = metrics.Counter("hint_task_cache_misses", description="task states generated")
        self._evictions = metrics.Counter("hint_task_cache_evictions",
                                          description="task states dropped to stay under the cache bound")
        self._bytes = metrics.Gauge("hint_task_cache_bytes",
                                    description="bytes of task states in memory: kept, held by requests, stacked")

    async def predict(self, instruction: str, inputs: list[str], generation: dict | None = None) -> dict:
        asked = self.predictor.generation(**(generation or {}))
        loop = asyncio.get_running_loop()
        key, ids = await loop.run_in_executor(self._text_pool, self.predictor.reader.tokenize, instruction, inputs)
        evictions = self.predictor.cache.stats.evictions
        state, hit = await self._task_state(key)
        try:
            (self._hits if hit else self._misses).inc()
            if self.predictor.cache.stats.evictions > evictions:
                self._evictions.inc(self.predictor.cache.stats.evictions - evictions)
            self._bytes.set(self.predictor.cache.stats.total_bytes)
            outputs = await asyncio.gather(*(self._batcher((state, i, asked)) for i in ids))
        finally:
            self.predictor.cache.release(state)
        return {"outputs": list(outputs), "cache_hit": hit}

    async def _task_state(self, key) -> tuple[TaskModules, bool]:
        """The task's state, held; a request cancelled (timed out) meanwhile still releases it.
        A kept one is looked up here, not behind the batch the model thread is running."""
        state = self.predictor.cache.get(key, count_miss=False)
        if state is not None:
            return state, True
        # The model thread looks again (a request of the same task may have generated it).
        future = asyncio.get_running_loop().run_in_executor(self._pool, self.predictor.task_state, key)
        try:
            return await asyncio.shield(future)
        except asyncio.CancelledError:
            future.add_done_callback(lambda f: f.exception() or self.predictor.cache.release(f.result()[0]))
            raise

    async def adapter(self, instruction: str, name: str) -> bytes:
        """The task's PEFT adapter as a tar.gz of one folder, `name`, from its kept state when
        there is one; a model whose tasks are no plain LoRA is refused before any work."""
        adapter.check(self.predictor.model.config, self.max_adapter_bytes)
        loop = asyncio.get_running_loop()
        key, _ = await loop.run_in_executor(self._text_pool, self.predictor.reader.tokenize, instruction, [])
        state, _ = await self._task_state(key)
        try:
            return await loop.run_in_executor(self._pool, adapter.archive, self.predictor, state,
                                              instruction, name, self.source, self.base)
        finally:
            self.predictor.cache.release(state)

    async def warm(self, instruction: str) -> bool:
        """Generate and cache the task's state; True if it was cached already."""
        return (await self.predict(instruction, []))["cache_hit"]

    def stats(self) -> dict:
        stats = self.predictor.cache.stats
        p = self.predictor
        return {**asdict(stats), "hit_rate": stats.hit_rate, "batches": p.batches, "mixed_batches": p.mixed_batches,
                "rows": p.rows, "state_seconds": p.state_seconds, "generate_seconds": p.generate_seconds,
                "longest_state_bytes": p.longest_state_bytes, "max_hyper_len": p.model.config.max_hyper_len}


class TaskIds:
    """task_id -> instruction for the ids the ingress handed out; the least recently used go
    beyond `max_entries` ids or `max_bytes` of instructions (UTF-8), so a flood of distinct
    instructions cannot grow it without bound."""

    def __init__(self, max_entries: int, max_bytes: int):
        self.max_entries, self.max_bytes = max_entries, max_bytes
        self._instructions: OrderedDict[str, str] = OrderedDict()
        self.bytes = 0

    def add(self, instruction: str) -> str:
        data = instruction.encode()
        task_id = hashlib.sha256(data).hexdigest()[:16]
        if task_id not in self._instructions:
            self.bytes += len(data)
        self._instructions[task_id] = instruction
        self._instructions.move_to_end(task_id)
        while len(self._instructions) > self.max_entries or (self.bytes > self.max_bytes and len(self) > 1):
            self.bytes -= len(self._instructions.popitem(last=False)[1].encode())
        return task_id

    def get(self, task_id: str) -> str | None:
        instruction = self._instructions.get(task_id)
        if instruction is not None:
            self._instructions.move_to_end(task_id)
        return instruction

    def __len__(self) -> int:
        return len(self._instructions)

    def __contains__(self, task_id: str) -> bool:
        return task_id in self._instructions


@serve.deployment(ray_actor_options={"num_cpus": 0})
class HintIngress:
    def __init__(self, replica: DeploymentHandle, options: dict):
        self.replica, self.opts = replica, ServeOptions(**options)
        self.tasks = TaskIds(max_entries=100_000, max_bytes=64 * 2**20)
        self._latency = metrics.Histogram(
            "hint_request_latency_ms", description="request latency at the ingress",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000], tag_keys=("route", "status"))

    async def __call__(self, request: Request) -> Response:
        start = time.perf_counter()
        route = route_of(request.scope)
        request.state.waiting = "for the request body"
        try:
            async with asyncio.timeout(self.opts.request_timeout_s):
                status, body = 200, await self._route(request, route)
        except HttpError as e:
            status, body = e.status, {"error": e.reason}
        except BadRequest as e:  # raised in a replica: only its message, never the remote traceback
            cause = getattr(e, "cause", e)
            status, body = cause.status, {"error": str(cause)}
        except BackPressureError:
            status, body = 503, {"error": f"busy: {self.opts.max_queued_requests} requests wait for the model "
                                          "already (--max-queued-requests); retry later"}
        except TimeoutError:
            status = 408 if request.state.waiting == "for the request body" else 504
            body = {"error": f"no answer within {self.opts.request_timeout_s:g} s (--request-timeout-s) "
                             f"waiting {request.state.waiting}"}
        except Exception:
            logger.exception("hint serve: a request to %s failed", route_tag(route))
            status, body = 500, {"error": "internal error; the server's log has the details"}
        self._latency.observe(1000 * (time.perf_counter() - start), tags={"route": route_tag(route), "status": str(status)})
        return body if isinstance(body, Response) else JSONResponse(body, status_code=status)

    async def _route(self, request: Request, route: str) -> dict | Response:
        if adapter_path := ADAPTER_PATH.fullmatch(route):
            if request.method != "GET":
                raise HttpError(405, f"{ADAPTER_ROUTE} takes GET, not {_show(request.method)}")
            request.state.waiting = "for the model"
            return await self._adapter(adapter_path[1])
        if route not in ROUTES:
            raise HttpError(404, f"no route {_show(route)}; routes: {', '.join([*ROUTES, ADAPTER_ROUTE])}")
        if request.method != ROUTES[route]:
            raise HttpError(405, f"{route} takes {ROUTES[route]}, not {_show(request.method)}")
        if route == "/v1/health":
            return {"status": "ok"}
        if route != "/v1/stats":
            body = await _json_object(request, 1024 * self.opts.max_body_kib)
        request.state.waiting = "for the model"
        if route == "/v1/stats":
            return await self.replica.stats.remote()
        unknown = [name for name in body if name not in FIELDS[route]]
        if unknown:
            raise HttpError(400, f"unknown field {_show(unknown[0])}; {route} takes: {', '.join(FIELDS[route])}")
        if route == "/v1/tasks":
            instruction = self._text(body, "instruction")
            await self.replica.warm.remote(instruction)
            return {"task_id": self.tasks.add(instruction)}
        return await self._predict(body)

    async def _predict(self, body: dict) -> dict:
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
            raise HttpError(400, "field 'inputs' must be a non-empty list of strings")
        if len(inputs) > self.opts.max_inputs:
            raise HttpError(413, f"too many inputs: {len(inputs)}, at most {self.opts.max_inputs} a request")
        for i, text in enumerate(inputs):
            _check_text(text, f"inputs[{i}]", self.opts.max_chars)
        if "task_id" in body:
            task_id = body["task_id"]
            instruction = self.tasks.get(task_id) if isinstance(task_id, str) else None
            if instruction is None:
                raise HttpError(404, f"unknown task_id {_show(task_id)}: create it with POST /v1/tasks")
        elif "instruction" in body:
            instruction = self._text(body, "instruction")
        else:
            raise HttpError(400, "give 'task_id' (from POST /v1/tasks) or 'instruction'")
        generation = {name: body[name] for name in ("max_new_tokens", "num_beams") if name in body}
        result = await self.replica.predict.remote(instruction, inputs, generation)
        return {**result, "task_id": self.tasks.add(instruction)}

    async def _adapter(self, task_id: str) -> Response:
        instruction = self.tasks.get(task_id)
        if instruction is None:
            raise HttpError(404, f"unknown task_id {_show(task_id)}: create it with POST /v1/tasks")
        name = f"task-{task_id}"
        data = await self.replica.adapter.remote(instruction, name)
        return Response(data, media_type=adapter.ARCHIVE_TYPE,
                        headers={"Content-Disposition": f'attachment; filename="{name}.tar.gz"'})

    def _text(self, body: dict, name: str) -> str:
        if name not in body:
            raise HttpError(400, f"missing field {name!r}")
        if not isinstance(body[name], str):
            raise HttpError(400, f"field {name!r} must be a string")
        return _check_text(body[name], f"field {name!r}", self.opts.max_chars)


async def _json_object(request: Request, limit: int) -> dict:
    """The request's JSON object, read only up to `limit` bytes (Content-Length, or as it streams)."""
    length = request.headers.get("content-length", "0")
    if not length.isdigit():
        raise HttpError(400, f"bad Content-Length header {_show(length)}")
    if int(length) > limit:
        raise HttpError(413, f"request body of {int(length)} bytes, more than {limit} (--max-body-kib)")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > limit:
            raise HttpError(413, f"request body of more than {limit} bytes (--max-body-kib)")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HttpError(400, f"request body is not JSON: {e}") from None
    except RecursionError:
        raise HttpError(400, "request body is JSON nested too deeply") from None
    if not isinstance(body, dict):
        raise HttpError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _check_text(text: str, where: str, max_chars: int) -> str:
    """`text` if it is at most `max_chars` characters of well-formed Unicode."""
    if len(text) > max_chars:
        raise HttpError(413, f"{where} has {len(text)} characters, more than {max_chars} (--max-chars)")
    return check_text(text, where)


def route_of(scope: dict) -> str:
    """The request's path below the application's route prefix (Serve keeps the prefix in the
    path and puts it in root_path too)."""
    path, prefix = scope["path"], scope.get("root_path", "")
    if prefix and path.startswith(prefix):
        path = path[len(prefix):]
    return path.rstrip("/")


def route_tag(route: str) -> str:
    """The latency metric's route: one of ours, else "other" (a series per random path would grow
    without bound)."""
    if ADAPTER_PATH.fullmatch(route):
        return ADAPTER_ROUTE
    return route if route in ROUTES else "other"


def _show(value) -> str:
    """A client's value in an error message: short, and ASCII (it may hold lone surrogates)."""
    text = ascii(value)
    return text if len(text) <= 60 else text[:57] + "..."


def build_app(opts: ServeOptions):
    """The Serve application: the ingress in front of `opts.replicas` model replicas."""
    replica = HintReplica.options(
        num_replicas=opts.replicas,
        max_ongoing_requests=opts.max_ongoing_requests,
        max_queued_requests=opts.max_queued_requests,
        ray_actor_options={"num_cpus": opts.replica_cpus, "num_gpus": opts.replica_gpus},
        request_router_config=RequestRouterConfig(request_router_class=TaskAffinityRouter),
    ).bind(asdict(opts))
    # The ingress holds every request the replicas take or queue, plus headroom: health and
    # 4xx answers never wait behind model work.
    ingress_ongoing = opts.replicas * opts.max_ongoing_requests + opts.max_queued_requests + INGRESS_HEADROOM
    return HintIngress.options(max_ongoing_requests=ingress_ongoing,
                               max_queued_requests=opts.max_queued_requests).bind(replica, asdict(opts))


def run(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve on host:port (Ray must be initialised) and deploy as `opts.name`; returns the
    application's base URL. An application of that name already there is refused, not replaced."""
    serve.start(http_options={"host": host, "port": port, "request_timeout_s": opts.request_timeout_s + PROXY_GRACE_S})
    if opts.name in serve.status().applications:
        raise NameTaken(f"an application named {opts.name!r} is served on this Ray cluster already: "
                        "give this one another --name")
    serve.run(build_app(opts), name=opts.name, route_prefix=opts.route_prefix)
    return f"http://{host}:{port}{opts.route_prefix.rstrip('/')}"


def cache_summary(stats: dict) -> str:
    """A replica's cache bound for the start-up line, saying when one task state at the longest
    instruction does not fit in it (such instructions are then never cached)."""
    bound, longest = stats["capacity_bytes"] / 2**20, stats["longest_state_bytes"] / 2**20
    if stats["capacity_bytes"] >= stats["longest_state_bytes"]:
        return f"task-state cache {bound:.0f} MiB a replica"
    return (f"task-state cache {bound:.0f} MiB a replica, less than one task state at the longest instruction "
            f"({stats['max_hyper_len']} tokens, {longest:.0f} MiB): long instructions will not be cached")


def replica_stats(name: str) -> dict:
    """GET /v1/stats of the application `name` (one replica's), through its handle."""
    return serve.get_deployment_handle("HintReplica", app_name=name).stats.remote().result()


def stop(name: str, own_cluster: bool) -> None:
    """Stop serving: delete this application only; on a Ray this process started, then Serve
    too when no other application is left (a cluster joined may serve others, and a Ray
    `ray.init()` connected to without RAY_ADDRESS may be one: serve.shutdown() would delete them)."""
    serve.delete(name)
    if own_cluster and not serve.status().applications:
        serve.shutdown()
