"""Reaching one chosen replica through a Serve handle.

Serve's default request router picks replicas itself (power of two choices). Our
routing policy already picked the instance from Redis load reports, so the worker
deployments use `PinnedReplicaRouter`: a call that passes `replica=<unique id>` goes to
that replica and no other. Calls without a pin go to any replica.

A pin that names no running replica fails the call with `PinnedReplicaUnavailable`:
at once when Serve has dropped that replica (it died, or was stopped), else after
`PIN_GRACE_S` (a replica the registry lists before this handle has heard of it gets
that long). A call whose pinned replica could not be reached (Ray's
`ActorUnavailableError`: the process is gone but Serve's controller has not dropped it
yet, or the network failed) fails the same way on Serve's retry, instead of being sent
to the same replica again and again with backoff until the controller drops it.

It never waits in Serve's routing loop: that loop retries without yielding
to the event loop unless the router asks it to back off, so a pin that matches nothing
would spin it and freeze every coroutine of the process, health checks included.

Every replica Serve drops is also reported to the callbacks registered with
`watch_replica_deaths` (the cluster view excludes it from routing at once). The hub
(`router/replica_deaths.py`) is process-wide because Serve builds these routers itself,
one per handle.

It subclasses the plain `RequestRouter` (no FIFO mixin), whose matching is by request
id, so a replica chosen for one request is never handed to another. It overrides two
of Serve's internal hooks (`_choose_replica_for_request`, `on_replica_actor_died`,
`on_replica_actor_unavailable`); the Ray version is pinned exactly.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from ray.serve.request_router import PendingRequest, RequestRouter, RunningReplica

from router import replica_deaths
from worker.errors import InstanceUnavailable

logger = logging.getLogger(__name__)

PIN_KWARG = "replica"
ROUTER_CLASS_PATH = "router.pinning:PinnedReplicaRouter"
PIN_GRACE_S = 0.5  # how long a pin may name a replica this handle has not seen yet
_GONE_MEMORY_S = 600.0  # how long a dropped replica's id is remembered


class PinnedReplicaUnavailable(InstanceUnavailable):
    """The replica a call was pinned to is not running: retry on another instance."""

    def __init__(self, replica: str, why: str) -> None:
        super().__init__(f"replica {replica} {why}")
        self.replica = replica


# The cluster view's entry point to the hub (see router/replica_deaths.py).
watch_replica_deaths = replica_deaths.watch


def pinned_replica(request: PendingRequest | None) -> str | None:
    if request is None:
        return None
    pin = request.kwargs.get(PIN_KWARG)
    return pin if isinstance(pin, str) else None


class PinnedReplicaRouter(RequestRouter):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._gone: dict[str, float] = {}  # unique id -> time.monotonic() it was dropped
        self._unreachable: dict[str, float] = {}  # unique id -> time.time() of the last

    async def choose_replicas(
        self,
        candidate_replicas: list[RunningReplica],
        pending_request: PendingRequest | None = None,
    ) -> list[list[RunningReplica]]:
        pin = pinned_replica(pending_request)
        if pin is None or pending_request is None:
            return [candidate_replicas]
        # Sleep between tries rather than spin (see the module docstring).
        pending_request.routing_context.should_backoff = True
        chosen = [r for r in candidate_replicas if _unique_id(r) == pin]
        if chosen:
            return [chosen]
        if pin in self._gone:
            self._fail(pending_request, pin, "was stopped or died")
        elif time.time() - pending_request.created_at >= PIN_GRACE_S:
            self._fail(pending_request, pin, f"is not running (waited {PIN_GRACE_S}s)")
        else:
            return [[]]
        # The request is done: Serve's loop sees that on the next candidates it gets
        # and moves on without choosing any of them.
        return [candidate_replicas]

    async def _choose_replica_for_request(
        self, pending_request: PendingRequest, *, is_retry: bool = False
    ) -> RunningReplica:
        # Serve's own retry after a replica died comes here too: with no replica left
        # in the deployment it would wait for a new one instead of asking choose_replicas.
        pin = pinned_replica(pending_request)
        if pin is not None and pin in self._gone:
            raise PinnedReplicaUnavailable(pin, "was stopped or died")
        if pin is not None and self._unreachable.get(pin, 0.0) >= pending_request.created_at:
            # This call (or one since it began) could not reach the replica.
            raise PinnedReplicaUnavailable(pin, "could not be reached")
        replica: RunningReplica = await super()._choose_replica_for_request(
            pending_request, is_retry=is_retry
        )
        return replica

    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = {_unique_id(r) for r in self.curr_replicas.values()}
        super().update_replicas(replicas)
        now = {_unique_id(r) for r in replicas}
        for unique_id in now:
            self._gone.pop(unique_id, None)
        self._dropped(before - now)

    def on_replica_actor_unavailable(self, replica_id: Any) -> None:
        super().on_replica_actor_unavailable(replica_id)
        now = time.time()
        for unique_id, at in list(self._unreachable.items()):
            if now - at > _GONE_MEMORY_S:
                del self._unreachable[unique_id]
        self._unreachable[str(replica_id.unique_id)] = now

    def on_replica_actor_died(self, replica_id: Any) -> None:
        super().on_replica_actor_died(replica_id)
        self._dropped({str(replica_id.unique_id)})

    def _dropped(self, unique_ids: set[str]) -> None:
        now = time.monotonic()
        for unique_id, at in list(self._gone.items()):
            if now - at > _GONE_MEMORY_S:
                del self._gone[unique_id]
        fresh = unique_ids - self._gone.keys()
        for unique_id in fresh:
            self._gone[unique_id] = now
            replica_deaths.report(unique_id)
        if not fresh:
            return
        # Requests already waiting for a dropped pin (with no replica left, Serve's
        # loop waits for new replicas without asking choose_replicas).
        for pending in list(self._pending_requests_by_id.values()):
            pin = pinned_replica(pending)
            if pin is not None and pin in fresh and not pending.future.done():
                self._fail(pending, pin, "was stopped or died")

    def _fail(self, pending_request: PendingRequest, pin: str, why: str) -> None:
        if not pending_request.future.done():
            pending_request.future.set_exception(PinnedReplicaUnavailable(pin, why))
        self._remove_pending_request_from_indices(pending_request)


def _unique_id(replica: Any) -> str:
    return str(replica.replica_id.unique_id)


async def probe_replica(handle: Any, unique_id: str) -> None:
    """One cheap pinned call (`state`) to a worker replica; raises unless it answers.
    The caller bounds it."""
    if handle is None:
        raise PinnedReplicaUnavailable(unique_id, "belongs to no pool this router calls")
    await handle.state.remote(**{PIN_KWARG: unique_id})
