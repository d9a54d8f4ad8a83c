"""`hint predict MODEL SOURCE... --output DIR`: batch prediction on Ray Data (serving/batch.py)."""

from __future__ import annotations

import argparse
import json


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "predict", help="batch prediction over data specs or jsonl/parquet files (Ray Data)",
        description="Predict every row of the SOURCEs with MODEL on Ray Data: rows are sorted by "
                    "task and run over an actor pool (one model and task-state cache per actor, a "
                    "GPU each when the cluster has GPUs), so each actor generates a task's state "
                    "once. Rows are checked before any model work; each finished batch is written "
                    "to DIR as it completes, so running the same command again after a failure "
                    "predicts only what is missing. Then DIR/predictions.parquet (id, task, input, "
                    "prediction, references; each row once) and, where rows have references, "
                    "DIR/metrics.json (ROUGE-L / exact match per task) appear whole, and are logged "
                    "to MLflow with the job's parameters. Connects to the Ray "
                    "cluster of $RAY_ADDRESS (as in a Ray job), else starts a local one.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model", help="an export directory, or models:/NAME@ALIAS (models:/NAME/VERSION)")
    p.add_argument("sources", nargs="+", metavar="SOURCE",
                   help="a .jsonl / .parquet file with instruction and input columns (optional id, "
                        "task, references), or a data spec as YAML, e.g. "
                        "'{kind: sni, path: ../shared/data/sni, split: mini}' (part: test by default)")
    p.add_argument("--output", required=True, metavar="DIR", help="output directory")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="longest output (default: the model's target length)")
    p.add_argument("--num-beams", type=int, default=1, help="1: greedy; more: beam search")
    p.add_argument("--batch-size", type=int, default=16, help="inputs per forward")
    p.add_argument("--concurrency", type=int, default=1, help="actors, one model each (GPU clusters: at most one per GPU)")
    p.add_argument("--actor-cpus", type=float, default=0.5, help="CPUs per actor on a cluster without GPUs")
    p.add_argument("--cache-mib", type=float, default=None,
                   help="task-state cache of each actor (default: sized from the model and its device)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="default: bfloat16 on a GPU, float32 on the CPU")
    p.add_argument("--max-restarts", type=int, default=1,
                   help="restarts of an actor that died (crashed, killed for memory) before the job fails")
    p.add_argument("--max-input-len", type=int, default=1024, help="input tokens kept per row")
    p.add_argument("--tracking-uri", help="MLflow tracking URI for models:/ and the job's run "
                                          "(default: $MLFLOW_TRACKING_URI, else runs/mlflow.db)")
    p.add_argument("--experiment", default="hint-predict", help="MLflow experiment of the job's run")
    p.add_argument("--no-mlflow", action="store_true", help="log nothing (models:/ still needs a tracking URI)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import ray

    from hint_platform.config import ExperimentConfig
    from hint_platform.serving.batch import PredictOptions, parse_source, predict
    from hint_platform.tracking.runs import check_reachable, resolve_tracking_uri
    from hint_platform.training.driver import start_ray

    for source in args.sources:  # a bad source fails before Ray starts
        parse_source(source)
    needs_uri = not args.no_mlflow or args.model.startswith("models:/")
    uri = (args.tracking_uri or resolve_tracking_uri(ExperimentConfig())) if needs_uri else None
    if uri:
        check_reachable(uri)
    opts = PredictOptions(model=args.model, sources=args.sources, output=args.output,
                          tracking_uri=uri, experiment=args.experiment, max_new_tokens=args.max_new_tokens,
                          num_beams=args.num_beams, batch_size=args.batch_size,
                          concurrency=args.concurrency, actor_cpus=args.actor_cpus,
                          cache_mib=args.cache_mib, max_input_len=args.max_input_len, dtype=args.dtype,
                          max_restarts=args.max_restarts, max_task_retries=args.max_restarts)
    if not ray.is_initialized():
        start_ray()  # RAY_ADDRESS's cluster, else a local Ray with its dashboard on loopback
    summary = predict(opts, log_run=not args.no_mlflow, progress=lambda line: print(line, flush=True))
    print(json.dumps({k: v for k, v in summary.items() if k != "metrics"}, indent=1))
    overall = summary.get("metrics", {}).get("overall")
    if overall:
        print("overall: " + "  ".join(f"{k} {v:.2f}" for k, v in overall.items()))
    return 0
