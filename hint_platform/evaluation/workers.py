"""Evaluation as Ray work, never in a driver: the records' tasks spread over a pool of actors,
one model each on the device Ray assigned (a GPU each when the cluster has GPUs, bf16 there),
so the driver only reads the records, hands out whole tasks and scores what comes back. Each
task goes to one actor, which generates its modules once (inference.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import ray
from ray.util import ActorPool

from hint_platform import export
from hint_platform.evaluation.inference import group_by_instruction, model_device, predict_records
from hint_platform.placement import model_process_count, model_process_resources


@dataclass
class EvalWorkers:
    """How many model processes evaluate, and what each asks Ray for."""

    count: int | None = None  # default: one per GPU (share) of the cluster; one without GPUs
    gpus: float | None = None  # per worker on a GPU cluster (default 1; 0.5: two share a GPU)
    cpus: float = 1.0  # per worker on a cluster without GPUs
    dtype: str | None = None  # default: bf16 on a GPU, fp32 on the CPU


class EvalWorker:
    """One model, loaded where Ray placed this actor; predicts the records of whole tasks."""

    def __init__(self, export_dir: str, dtype: str | None):
        self.model, self.tokenizer = export.load(export_dir, dtype=dtype)

    def where(self) -> dict[str, Any]:
        return {"pid": os.getpid(), "node": ray.get_runtime_context().get_node_id(),
                "device": str(model_device(self.model))}

    def predict(self, index: int, records: list[dict], batch_size: int,
                max_new_tokens: int | None) -> tuple[int, list[dict]]:
        return index, predict_records(self.model, self.tokenizer, records, batch_size=batch_size,
                                      max_new_tokens=max_new_tokens)


def predict_on_ray(export_dir: str | Path, records: list[dict], workers: EvalWorkers, *,
                   batch_size: int = 16, max_new_tokens: int | None = None,
                   progress: Callable[[str], None] | None = None) -> tuple[list[dict], list[dict]]:
    """(predictions in the records' task order, where each worker ran: pid, node, device)."""
    groups = list(group_by_instruction(records).values())
    if not groups:
        raise ValueError("predict_on_ray: no evaluation records")
    cluster = ray.cluster_resources()
    resources = model_process_resources(cluster, workers.gpus, workers.cpus)
    count = model_process_count(cluster, resources, workers.count, len(groups))
    if progress:
        share = f"{resources['num_gpus']:g} GPU" if "num_gpus" in resources else f"{resources['num_cpus']:g} CPU"
        progress(f"evaluating {len(groups)} task(s) on {count} Ray worker(s), {share} each")
    # A worker lost to a node failure is restarted once; an error in the evaluation is not retried.
    actor = ray.remote(max_restarts=1, max_task_retries=0)(EvalWorker)
    # "DEFAULT": not inside a calling Tune trial's placement group (its bundle is a sliver of CPU)
    actors = [actor.options(**resources, scheduling_strategy="DEFAULT").remote(str(export_dir), workers.dtype) for _ in range(count)]
    try:
        placed = ray.get([a.where.remote() for a in actors])
        pool = ActorPool(actors)
        by_group: list[list[dict]] = [[] for _ in groups]
        calls = pool.map_unordered(lambda a, item: a.predict.remote(item[0], item[1], batch_size, max_new_tokens),
                                   list(enumerate(groups)))
        for done, (index, predictions) in enumerate(calls, start=1):
            by_group[index] = predictions
            if progress:
                rows = groups[index]
                progress(f"evaluated task {done}/{len(groups)}: {rows[0]['task']} ({len(rows)} examples)")
    finally:
        for a in actors:
            ray.kill(a)
    return [p for predictions in by_group for p in predictions], placed
