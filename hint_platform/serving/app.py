"""`hint serve`: a HINT model behind Ray Serve.

Two deployments. `HintIngress` (one replica, no model) speaks HTTP: it checks each request,
keeps the task ids it handed out (task_id -> instruction) and answers 4xx with the reason for
a bad one. `HintReplica` (N replicas) holds the model and a CachedPredictor whose LRU cache
of task states is bounded in MiB; its `@serve.batch` method gathers the inputs of concurrent
requests, of any tasks, into one mixed-task forward. With several replicas a task's requests go
to the replica that holds its state (serving/routing.py).

  POST /v1/tasks    {"instruction": str}                       -> {"task_id"}
  POST /v1/predict  {"task_id" | "instruction", "inputs": [str]} -> {"outputs", "task_id", "cache_hit"}
  GET  /v1/health   -> {"status": "ok"};   GET /v1/stats -> one replica's cache counters

Metrics (Prometheus, via ray.serve.metrics): hint_task_cache_{hits,misses,evictions}
counters, hint_task_cache_bytes gauge (per replica), hint_request_latency_ms histogram (per
route and status).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass

from ray import serve
from ray.serve import metrics
from ray.serve.config import RequestRouterConfig
from ray.serve.handle import DeploymentHandle
from starlette.requests import Request
from starlette.responses import JSONResponse

from hint_model import TaskModules
from hint_platform.serving.predictor import BadRequest, CachedPredictor
from hint_platform.serving.routing import TaskAffinityRouter
from hint_platform.tracking.registry import resolve_export


@dataclass
class ServeOptions:
    """What `hint serve` configures; travels to the replicas as plain values."""

    model: str
    tracking_uri: str | None = None
    replicas: int = 1
    cache_mib: float = 256.0
    max_new_tokens: int | None = None  # None: the model's target length
    num_beams: int = 1
    max_batch_size: int = 16
    batch_wait_ms: float = 5.0
    max_inputs: int = 64  # per /v1/predict request
    replica_cpus: float = 1.0
    replica_gpus: float = 0.0


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
        # One thread runs the model, so the event loop keeps taking requests into the batch.
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._batched.set_max_batch_size(opts.max_batch_size)
        self._batched.set_batch_wait_timeout_s(opts.batch_wait_ms / 1000)
        self._hits = metrics.Counter("hint_task_cache_hits", description="task states served from the cache")
        self._misses = metrics.Counter("hint_task_cache_misses", description="task states generated")
        self._evictions = metrics.Counter("hint_task_cache_evictions",
                                          description="task states dropped to stay under the cache bound")
        self._bytes = metrics.Gauge("hint_task_cache_bytes", description="bytes of cached task states")

    async def predict(self, instruction: str, inputs: list[str]) -> dict:
        key = self.predictor.task_key(instruction)
        ids = [self.predictor.input_ids(instruction, text) for text in inputs]
        loop = asyncio.get_running_loop()
        evictions = self.predictor.cache.stats.evictions
        state, hit = await loop.run_in_executor(self._pool, self.predictor.task_state, key)
        (self._hits if hit else self._misses).inc()
        if self.predictor.cache.stats.evictions > evictions:
            self._evictions.inc(self.predictor.cache.stats.evictions - evictions)
        self._bytes.set(self.predictor.cache.stats.bytes)
        outputs = await asyncio.gather(*(self._batched((state, i)) for i in ids))
        return {"outputs": list(outputs), "cache_hit": hit}

    async def warm(self, instruction: str) -> bool:
        """Generate and cache the task's state; True if it was cached already."""
        return (await self.predict(instruction, []))["cache_hit"]

    def stats(self) -> dict:
        stats = self.predictor.cache.stats
        return {**asdict(stats), "hit_rate": stats.hit_rate, "batches": self.predictor.batches,
                "mixed_batches": self.predictor.mixed_batches}

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def _batched(self, items: list[tuple[TaskModules, list[int]]]) -> list[str]:
        return await asyncio.get_running_loop().run_in_executor(self._pool, self.predictor.generate, items)


@serve.deployment(ray_actor_options={"num_cpus": 0})
class HintIngress:
    def __init__(self, replica: DeploymentHandle, max_inputs: int, max_tasks: int = 100_000):
        self.replica, self.max_inputs, self.max_tasks = replica, max_inputs, max_tasks
        self.tasks: OrderedDict[str, str] = OrderedDict()  # task_id -> instruction
        self._latency = metrics.Histogram(
            "hint_request_latency_ms", description="request latency at the ingress",
            boundaries=[5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000], tag_keys=("route", "status"))

    async def __call__(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        route = request.url.path.rstrip("/")
        try:
            status, body = 200, await self._route(request, route)
        except HttpError as e:
            status, body = e.status, {"error": e.reason}
        except BadRequest as e:  # raised in a replica: the instruction or an input
            status, body = 400, {"error": str(e)}
        self._latency.observe(1000 * (time.perf_counter() - start), tags={"route": route, "status": str(status)})
        return JSONResponse(body, status_code=status)

    async def _route(self, request: Request, route: str) -> dict:
        routes = {"/v1/health": "GET", "/v1/stats": "GET", "/v1/tasks": "POST", "/v1/predict": "POST"}
        if route not in routes:
            raise HttpError(404, f"no route {route}; routes: {', '.join(routes)}")
        if request.method != routes[route]:
            raise HttpError(405, f"{route} takes {routes[route]}, not {request.method}")
        if route == "/v1/health":
            return {"status": "ok"}
        if route == "/v1/stats":
            return await self.replica.stats.remote()
        body = await _json_object(request)
        if route == "/v1/tasks":
            instruction = _string_field(body, "instruction")
            await self.replica.warm.remote(instruction)
            return {"task_id": self._remember(instruction)}
        return await self._predict(body)

    async def _predict(self, body: dict) -> dict:
        inputs = body.get("inputs")
        if not isinstance(inputs, list) or not inputs or not all(isinstance(x, str) for x in inputs):
            raise HttpError(400, "field 'inputs' must be a non-empty list of strings")
        if len(inputs) > self.max_inputs:
            raise HttpError(413, f"too many inputs: {len(inputs)}, at most {self.max_inputs} a request")
        if "task_id" in body:
            task_id = body["task_id"]
            if not isinstance(task_id, str) or task_id not in self.tasks:
                raise HttpError(404, f"unknown task_id {task_id!r}: create it with POST /v1/tasks")
            instruction = self.tasks[task_id]
            self.tasks.move_to_end(task_id)
        elif "instruction" in body:
            instruction = _string_field(body, "instruction")
        else:
            raise HttpError(400, "give 'task_id' (from POST /v1/tasks) or 'instruction'")
        result = await self.replica.predict.remote(instruction, inputs)
        return {**result, "task_id": self._remember(instruction)}

    def _remember(self, instruction: str) -> str:
        task_id = hashlib.sha256(instruction.encode()).hexdigest()[:16]
        self.tasks[task_id] = instruction
        self.tasks.move_to_end(task_id)
        while len(self.tasks) > self.max_tasks:
            self.tasks.popitem(last=False)
        return task_id


async def _json_object(request: Request) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HttpError(400, f"request body is not JSON: {e}") from None
    if not isinstance(body, dict):
        raise HttpError(400, f"request body must be a JSON object, got {type(body).__name__}")
    return body


def _string_field(body: dict, name: str) -> str:
    if name not in body:
        raise HttpError(400, f"missing field {name!r}")
    if not isinstance(body[name], str):
        raise HttpError(400, f"field {name!r} must be a string")
    return body[name]


def build_app(opts: ServeOptions):
    """The Serve application: the ingress in front of `opts.replicas` model replicas."""
    replica = HintReplica.options(
        num_replicas=opts.replicas,
        ray_actor_options={"num_cpus": opts.replica_cpus, "num_gpus": opts.replica_gpus},
        request_router_config=RequestRouterConfig(request_router_class=TaskAffinityRouter),
    ).bind(asdict(opts))
    return HintIngress.bind(replica, opts.max_inputs)


def run(opts: ServeOptions, host: str = "127.0.0.1", port: int = 8000) -> str:
    """Start Serve on host:port (Ray must be initialised) and deploy; returns the base URL."""
    serve.start(http_options={"host": host, "port": port})
    serve.run(build_app(opts), name="hint", route_prefix="/")
    return f"http://{host}:{port}"
