"""Task affinity for `hint serve --replicas N`: a task's requests go to the replica that holds its
state.

Each replica caches the task states it generated (serving/predictor.py), so Serve's default
power-of-two-choices routing, which picks replicas at random, would generate a task's state
on every replica in turn. `TaskAffinityRouter` ranks the replicas by rendezvous hashing of the
request's instruction: every task has its own order of replicas, the same in every router,
and adding or removing a replica moves only the tasks it gains or held. The first replica of
that order takes the request unless its queue is full, then the second, and so on. Requests
without an instruction (stats) go to the shortest queue as usual, and so does any request the
ranking fails on: Serve never resolves a request whose routing raised, and every later request
of the handle then waits behind it.

It is Ray Serve's public request-router extension (`ray.serve.request_router`); serve.multiplexed
would route by task too, but it is made for one model per id, loaded and evicted by count, where
a task state is one entry of a cache bounded in MiB, and the replicas' batches mix tasks on purpose.
"""

from __future__ import annotations

import hashlib
import logging

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

logger = logging.getLogger("ray.serve")


def replica_order(task: str, replica_ids: list[str]) -> list[str]:
    """Rendezvous (highest random weight) order of `replica_ids` for `task`."""
    def weight(replica_id: str) -> bytes:
        # surrogatepass: a lone surrogate (JSON's "\\ud800") hashes like any other character.
        return hashlib.sha256(f"{replica_id}\0{task}".encode("utf-8", "surrogatepass")).digest()

    return sorted(replica_ids, key=weight, reverse=True)


class TaskAffinityRouter(RequestRouter):
    """Ranks the replicas for a request by `replica_order` of its instruction (the first
    positional argument of HintReplica.predict / warm). The base RequestRouter hands the replica
    it finds to that very request (no FIFO matching), so the ranking holds."""

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        args = pending_request.args if pending_request is not None else []
        if not args or not isinstance(args[0], str):
            return [candidate_replicas]
        try:
            by_id = {r.replica_id.unique_id: r for r in candidate_replicas}
            return [[by_id[i]] for i in replica_order(args[0], list(by_id))]
        except Exception:
            logger.exception("TaskAffinityRouter: ranking failed; routing to the shortest queue")
            return [candidate_replicas]
