"""`hint serve MODEL`: an online endpoint on Ray Serve (serving/app.py)."""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import threading


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve", help="serve a model over HTTP (Ray Serve), task states cached per replica",
        description="Serve MODEL on Ray Serve: POST /v1/tasks {instruction} -> {task_id}; POST "
                    "/v1/predict {task_id | instruction, inputs: [...]} -> {outputs}; GET "
                    "/v1/health; GET /v1/stats; GET /v1/tasks/{task_id}/adapter (a lora_only model's task as a "
                    "PEFT adapter, tar.gz). Each replica keeps an LRU cache of task states "
                    "bounded in MiB; concurrent requests, of any tasks, are batched together. "
                    "Bad requests get a 4xx with the reason, before any model work: bodies over "
                    "--max-body-kib, text over --max-chars or not well-formed Unicode, unknown "
                    "fields, max_new_tokens / num_beams above the server's. Load is bounded: "
                    "--max-ongoing-requests per replica, --max-queued-requests waiting (then 503), "
                    "--request-timeout-s per request (then 504). Listens on loopback unless --host "
                    "says otherwise; Ctrl-C stops it and deletes only its own application (--name: "
                    "two serves on one cluster need two names; a name other than hint answers under /NAME).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export directory, or models:/NAME@ALIAS (models:/NAME/VERSION)")
    p.add_argument("--name", default="hint", help="the Serve application's name; another than hint answers "
                                                "under /NAME (two serves on one cluster need two names)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--replicas", type=int, default=1, help="model replicas (one model and cache each)")
    p.add_argument("--cache-mib", type=float, default=None,
                   help="task states per replica, kept and in flight (0: none kept; default: sized from the "
                        "model and the device's free memory)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest output (default: the model's target length); a request may ask for fewer")
    p.add_argument("--num-beams", type=int, default=1,
                   help="1: greedy; more: beam search; a request may ask for fewer")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="inputs per forward: a free model takes every input waiting, up to this")
    p.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long an idle model waits for more inputs to come with the first")
    p.add_argument("--max-inputs", type=int, default=64, help="inputs per request")
    p.add_argument("--max-chars", type=int, default=32_768, help="characters per instruction or input")
    p.add_argument("--max-body-kib", type=int, default=4096, help="request body size")
    p.add_argument("--max-ongoing-requests", type=int, default=32,
                   help="requests a model replica works on at once (its batches draw from them)")
    p.add_argument("--max-queued-requests", type=int, default=256,
                   help="requests waiting for a model replica; beyond, 503")
    p.add_argument("--request-timeout-s", type=float, default=60.0,
                   help="a request's time from arrival to answer; beyond, 504")
    p.add_argument("--max-adapter-mib", type=float, default=256.0,
                   help="largest task adapter GET /v1/tasks/{task_id}/adapter sends (its tensors)")
    p.add_argument("--adapter-base", metavar="NAME",
                   help="the base GET /v1/tasks/{task_id}/adapter names (base_model_name_or_path), "
                        "as hint adapter --base (default: the Hugging Face checkpoint the model was "
                        "built from, as its export records it: a hub name, else its path)")
    p.add_argument("--replica-cpus", type=float, default=1.0)
    p.add_argument("--replica-gpus", type=float, default=None, help="default: 1 when the cluster has GPUs")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ (default: $MLFLOW_TRACKING_URI, "
                                          "else runs/mlflow.db)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from hint_platform.config import ExperimentConfig
    from hint_platform.serving import app
    from hint_platform.tracking.runs import check_reachable, resolve_tracking_uri
    from hint_platform.training.driver import start_ray

    opts = app.ServeOptions(model=args.model, name=args.name, replicas=args.replicas, cache_mib=args.cache_mib,
                            max_new_tokens=args.max_new_tokens, num_beams=args.num_beams,
                            max_batch_size=args.max_batch_size, batch_wait_ms=args.batch_wait_ms,
                            max_inputs=args.max_inputs, max_chars=args.max_chars, max_body_kib=args.max_body_kib,
                            max_ongoing_requests=args.max_ongoing_requests,
                            max_queued_requests=args.max_queued_requests, request_timeout_s=args.request_timeout_s,
                            max_adapter_mib=args.max_adapter_mib, adapter_base=args.adapter_base,
                            replica_cpus=args.replica_cpus, replica_gpus=args.replica_gpus or 0.0)
    if args.model.startswith("models:/"):
        opts.tracking_uri = args.tracking_uri or resolve_tracking_uri(ExperimentConfig())
        check_reachable(opts.tracking_uri)
    # Our own Ray: started here, not RAY_ADDRESS's cluster nor one this process had joined.
    own_ray = not ray.is_initialized() and not os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        start_ray()  # RAY_ADDRESS's cluster, else a local Ray with its dashboard on loopback
    if args.replica_gpus is None:
        opts = dataclasses.replace(opts, replica_gpus=float(ray.cluster_resources().get("GPU", 0) > 0))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    ours = True
    try:
        url = app.run(opts, host=args.host, port=args.port)
        sized = "sized from the model and device" if args.cache_mib is None else "--cache-mib"
        print(f"hint serve: {args.model} as {opts.name!r} on {url} ({args.replicas} replica(s), "
              f"{app.cache_summary(app.replica_stats(opts.name))}, {sized}); POST {url}/v1/predict, "
              f"GET {url}/v1/health. Ctrl-C stops.", flush=True)
        stop.wait()
    except app.NameTaken:
        ours = False  # another serve's application: left alone
        raise
    finally:
        if ours:
            app.stop(opts.name, own_cluster=own_ray)
        ray.shutdown()
    print("hint serve: stopped", flush=True)
    return 0
