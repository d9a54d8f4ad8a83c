"""`hint serve MODEL`: an online endpoint on Ray Serve (serving/app.py)."""

from __future__ import annotations

import argparse
import signal
import threading


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (Ray Serve), task states cached per replica",
        description="Serve MODEL on Ray Serve: POST /v1/tasks {instruction} -> {task_id}; POST "
                    "/v1/predict {task_id | instruction, inputs: [...]} -> {outputs}; GET "
                    "/v1/health; GET /v1/stats. Each replica keeps an LRU cache of task states "
                    "bounded in MiB; concurrent requests, of any tasks, are batched together. "
                    "Bad requests get a 4xx with the reason. Listens on loopback unless --host "
                    "says otherwise; Ctrl-C stops it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export directory, or models:/NAME@ALIAS (models:/NAME/VERSION)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model replicas (one model and cache each)")
    p.add_argument("--cache-mib", type=float, default=256.0, help="task-state cache per replica (0: off)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest output (default: the model's target length)")
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy; more: beam search")
    p.add_argument("--max-batch-size", type=int, default=16, help="inputs per batched forward")
    p.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill")
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per request")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--replica-gpus", type=float, default=None, help="default: 1 when the cluster has GPUs")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: $MLFLOW_TRACKING_URI, "
                                          "else runs/mlflow.db)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray
    from ray import serve

    from hint_platform.config import ExperimentConfig
    from hint_platform.serving import app
    from hint_platform.tracking.runs import check_reachable, resolve_tracking_uri
    from hint_platform.training.driver import start_ray

    uri = None
    if args.model.startswith("models:/"):
        uri = args.tracking_uri or resolve_tracking_uri(ExperimentConfig())
        check_reachable(uri)
    if not ray.is_initialized():
        start_ray()  # RAY_ADDRESS's cluster, else a local Ray with its dashboard on loopback
    gpus = args.replica_gpus if args.replica_gpus is not None else float(ray.cluster_resources().get("GPU", 0) > 0)
    opts = app.ServeOptions(model=args.model, tracking_uri=uri, replicas=args.replicas,
                            cache_mib=args.cache_mib, max_new_tokens=args.max_new_tokens,
                            num_beams=args.num_beams, max_batch_size=args.max_batch_size,
                            batch_wait_ms=args.batch_wait_ms, max_inputs=args.max_inputs,
                            replica_cpus=args.replica_cpus, replica_gpus=gpus)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        url = app.run(opts, host=args.host, port=args.port)
        print(f"hint serve: {args.model} on {url} ({args.replicas} replica(s), cache {args.cache_mib:g} MiB "
              f"each); POST {url}/v1/predict, GET {url}/v1/health. Ctrl-C stops.", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
    print("hint serve: stopped", flush=True)
    return 0
