"""Reaching one chosen replica through a Serve handle.

Serve's default request router picks replicas itself (power of two choices). Our
routing policy already picked the instance from Redis load reports, so the worker
deployments use `PinnedReplicaRouter`: a call that passes `replica=<unique id>` goes to
that replica and no other. If it is not among the running replicas, the call waits in
Serve's routing backoff; callers bound every call with a timeout. Calls without a pin
go to any replica.

It subclasses the plain `RequestRouter` (no FIFO mixin), whose matching is by request
id, so a replica chosen for one request is never handed to another.
"""

from __future__ import annotations

from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

PIN_KWARG = "replica"
ROUTER_CLASS_PATH = "router.pinning:PinnedReplicaRouter"


def pinned_replica(request: PendingRequest | None) -> str | None:
    if request is None:
        return None
    pin = request.kwargs.get(PIN_KWARG)
    return pin if isinstance(pin, str) else None


class PinnedReplicaRouter(RequestRouter):
    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        pin = pinned_replica(pending_request)
        if pin is None:
            return [candidate_replicas]
        return [[r for r in candidate_replicas if _unique_id(r) == pin]]


def _unique_id(replica: Any) -> str:
    return str(replica.replica_id.unique_id)
