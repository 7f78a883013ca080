"""The router's circuit breaker on an injected clock: a failure excludes an instance at
once; it is probed only after a heartbeat newer than its exclusion, and returns only
when the probe succeeds; instances the registry dropped are forgotten. Also which
errors count as an instance's failure."""

from __future__ import annotations

import pytest
from ray.exceptions import ActorDiedError, RayTaskError

from router.breaker import CircuitBreaker
from router.pinning import PinnedReplicaUnavailable
from router.worker_errors import is_instance_failure
from worker.engine_loop import EngineStopped


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_a_trip_excludes_at_once_and_counts_once(clock: Clock) -> None:
    kinds: list[str] = []
    b = CircuitBreaker(clock, on_trip=kinds.append)
    assert not b.excluded("a")
    assert b.trip("a", "call", "died")
    assert not b.trip("a", "serve", "dropped")  # already out
    assert b.excluded("a") and b.excluded_addresses() == {"a"} and not b.excluded("b")
    assert kinds == ["call"] and b.trips == 1


def test_it_returns_only_after_a_newer_heartbeat_and_a_good_probe(clock: Clock) -> None:
    b = CircuitBreaker(clock)
    b.trip("a", "call", "unavailable")
    assert not b.probe_due("a", None)  # no heartbeat yet
    assert not b.probe_due("a", clock.now - 0.5)  # a heartbeat from before the failure
    assert not b.probe_due("a", clock.now)
    clock.now += 1.0
    assert b.probe_due("a", clock.now - 0.1)
    assert not b.probe_due("a", clock.now)  # one probe at a time
    assert b.excluded("a")  # still out while probing
    b.probed("a", True)
    assert not b.excluded("a")


def test_a_failed_probe_needs_a_heartbeat_newer_than_the_probe(clock: Clock) -> None:
    kinds: list[str] = []
    b = CircuitBreaker(clock, on_trip=kinds.append)
    b.trip("a", "call", "unavailable")
    clock.now += 1.0
    heartbeat = clock.now
    assert b.probe_due("a", heartbeat)
    clock.now += 0.5
    b.probed("a", False, "timeout")
    assert b.excluded("a")
    assert not b.probe_due("a", heartbeat)  # the same heartbeat does not earn a new probe
    clock.now += 1.0
    assert b.probe_due("a", clock.now)
    b.probed("a", True)
    assert not b.excluded("a")
    assert kinds == ["call", "probe"]


def test_a_trip_during_a_probe_wins_over_its_result(clock: Clock) -> None:
    b = CircuitBreaker(clock)
    b.trip("a", "call", "x")
    clock.now += 1.0
    assert b.probe_due("a", clock.now)
    assert b.trip("a", "serve", "dropped")  # a new failure while the probe runs
    b.probed("a", True)  # the stale probe's success is ignored
    assert b.excluded("a")


def test_forget_drops_instances_the_registry_no_longer_lists(clock: Clock) -> None:
    b = CircuitBreaker(clock)
    b.trip("a", "call", "x")
    b.trip("b", "call", "x")
    b.forget(["b", "c"])
    assert b.excluded_addresses() == {"b"}
    b.probed("a", True)  # a late probe result for a forgotten instance is harmless
    assert b.excluded_addresses() == {"b"}


def test_which_errors_mean_the_instance_failed() -> None:
    assert is_instance_failure(ActorDiedError())
    assert is_instance_failure(PinnedReplicaUnavailable("r", "died"))
    assert is_instance_failure(RayTaskError("generate", "", EngineStopped("engine failed")))
    try:
        raise RuntimeError("wrapped") from ActorDiedError()
    except RuntimeError as e:
        assert is_instance_failure(e)
    assert not is_instance_failure(ValueError("bad prompt"))
    assert not is_instance_failure(TimeoutError())
    assert not is_instance_failure(RayTaskError("generate", "", ValueError("bad")))
