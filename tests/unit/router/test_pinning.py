"""The pinned request router inside Serve's own routing loop (no cluster): a pin to a
running replica is routed to it; a pin to a replica that is not running fails fast
with PinnedReplicaUnavailable while the event loop keeps running; a replica Serve drops
is reported to the death watchers, and later calls pinned to it fail at once even when
the deployment has no replica left."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from typing import Any

from ray.serve._private.common import (
    DeploymentHandleSource,
    DeploymentID,
    ReplicaID,
    RequestMetadata,
)
from ray.serve.request_router import PendingRequest

from router.pinning import (
    PIN_GRACE_S,
    PIN_KWARG,
    PinnedReplicaRouter,
    PinnedReplicaUnavailable,
    watch_replica_deaths,
)

DEPLOYMENT = DeploymentID(name="decode", app_name="app")


class _Replica:
    """The part of Serve's RunningReplica that its request router reads."""

    def __init__(self, unique_id: str) -> None:
        self.replica_id = ReplicaID(unique_id, DEPLOYMENT)
        self.max_ongoing_requests = 100
        self.is_cross_language = False

    async def get_queue_len(self, *, deadline_s: float) -> int:
        return 0


def _request(pin: str | None) -> PendingRequest:
    rid = uuid.uuid4().hex
    kwargs = {PIN_KWARG: pin} if pin is not None else {}
    return PendingRequest(args=[], kwargs=kwargs, metadata=RequestMetadata(rid, rid))


def _run_bounded(make: Callable[[], Coroutine[Any, Any, Any]], timeout_s: float = 20.0) -> Any:
    """Run a coroutine on a fresh loop in a thread, so a loop that never yields fails
    the test instead of hanging it."""
    out: dict[str, Any] = {}

    def target() -> None:
        try:
            out["value"] = asyncio.run(make())
        except BaseException as e:
            out["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(timeout_s)
    assert not thread.is_alive(), "the event loop did not finish (it spins)"
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _router(*unique_ids: str) -> PinnedReplicaRouter:
    router = PinnedReplicaRouter(
        DEPLOYMENT, DeploymentHandleSource.REPLICA, use_replica_queue_len_cache=False
    )
    router.update_replicas([_Replica(u) for u in unique_ids])  # type: ignore[misc]
    return router


async def _longest_stall(work: Coroutine[Any, Any, Any]) -> tuple[Any, float]:
    """Run `work` next to a 10 ms ticker; return its result (or error) and the longest
    gap between two ticks."""
    gaps = [0.0]
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.01)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    tick = asyncio.create_task(ticker())
    try:
        result: Any = await asyncio.wait_for(work, 10.0)
    except Exception as e:
        result = e
    done.set()
    await tick
    return result, max(gaps)


def test_a_pin_to_a_running_replica_is_routed_to_it() -> None:
    async def run() -> list[str]:
        router = _router("a", "b")
        picks = [await router._choose_replica_for_request(_request(p)) for p in ("b", "a", "b")]
        return [str(r.replica_id.unique_id) for r in picks]

    assert _run_bounded(run) == ["b", "a", "b"]


def test_a_pin_to_a_replica_that_is_not_running_fails_without_freezing_the_loop() -> None:
    async def run() -> tuple[Any, float, float]:
        router = _router("a")
        began = time.monotonic()
        result, stall = await _longest_stall(router._choose_replica_for_request(_request("x")))
        return result, stall, time.monotonic() - began

    result, stall, took = _run_bounded(run)
    assert isinstance(result, PinnedReplicaUnavailable) and result.replica == "x"
    assert took >= PIN_GRACE_S  # the grace a replica the handle has not seen yet gets
    # A spinning loop never lets the ticker run (and never finishes: see _run_bounded);
    # the bound only has to sit far above a busy host's scheduling delays.
    assert stall < 3.0, f"the event loop stalled {stall:.2f}s"


def test_a_dropped_replica_is_reported_and_its_pins_fail_at_once() -> None:
    reported: list[str] = []
    stop = watch_replica_deaths(reported.append)
    try:

        async def run() -> tuple[Any, Any, float]:
            router = _router("a", "b")
            router.on_replica_actor_died(ReplicaID("a", DEPLOYMENT))
            router.update_replicas([])  # "b" stopped too: no replica left
            began = time.monotonic()
            first, _ = await _longest_stall(router._choose_replica_for_request(_request("a")))
            second, _ = await _longest_stall(router._choose_replica_for_request(_request("b")))
            return first, second, time.monotonic() - began

        first, second, took = _run_bounded(run)
    finally:
        stop()
    assert isinstance(first, PinnedReplicaUnavailable)
    assert isinstance(second, PinnedReplicaUnavailable)
    assert took < PIN_GRACE_S
    assert reported == ["a", "b"]


def test_unpinned_calls_go_to_any_replica() -> None:
    async def run() -> str:
        router = _router("a")
        return str((await router._choose_replica_for_request(_request(None))).replica_id.unique_id)

    assert _run_bounded(run) == "a"


def test_a_request_waiting_with_no_replica_left_fails_when_others_return() -> None:
    pin = "a"

    async def run() -> Any:
        router = _router(pin)
        router.on_replica_actor_died(ReplicaID(pin, DEPLOYMENT))  # no replica left
        router._gone.clear()  # as if the request had arrived before the death was known
        waiting = asyncio.create_task(router._choose_replica_for_request(_request(pin)))
        await asyncio.sleep(0.1)
        assert not waiting.done()  # Serve's loop waits for replicas to appear
        router.update_replicas([_Replica("c")])  # ... and the dropped one never does
        result, _ = await _longest_stall(waiting)
        return result

    assert isinstance(_run_bounded(run), PinnedReplicaUnavailable)


def test_a_call_whose_replica_could_not_be_reached_fails_on_serves_retry() -> None:
    async def run() -> tuple[Any, float, str]:
        router = _router("a", "b")
        waiting = _request("a")
        await asyncio.sleep(0.01)
        # Serve's routing loop got ActorUnavailableError from "a" for this call, told
        # the router, and asks it again (the replica is still in Serve's list).
        router.on_replica_actor_unavailable(ReplicaID("a", DEPLOYMENT))
        began = time.monotonic()
        retry, _ = await _longest_stall(router._choose_replica_for_request(waiting, is_retry=True))
        took = time.monotonic() - began
        # A call that begins later tries the replica again (it may be back).
        later = await router._choose_replica_for_request(_request("a"))
        return retry, took, str(later.replica_id.unique_id)

    retry, took, later = _run_bounded(run)
    assert isinstance(retry, PinnedReplicaUnavailable) and "reached" in str(retry)
    assert took < 1.0
    assert later == "a"
