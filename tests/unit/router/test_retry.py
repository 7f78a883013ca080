"""Retrying a request before its first token: on another decode instance, a bounded
number of times, only for UNAVAILABLE, never once a delta reached the client."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from router.errors import ErrorKind, RouterError
from router.policy import Candidate, RouteDecision
from router.results import Delta
from router.retry import with_retries


def _route(address: str) -> RouteDecision:
    return RouteDecision(Candidate(f"decode-{address}", address, 0, 0, 64), None, 10)


class Pool:
    """Decode instances by address: each either fails before its first delta, fails
    after one, or streams two deltas."""

    def __init__(self, behaviour: dict[str, str], kind: ErrorKind = ErrorKind.UNAVAILABLE):
        self.behaviour = behaviour
        self.kind = kind
        self.runs: list[str] = []
        self.avoided: list[frozenset[str]] = []

    async def run(self, route: RouteDecision) -> AsyncIterator[Delta]:
        address = route.decode.address
        self.runs.append(address)
        await asyncio.sleep(0)
        how = self.behaviour[address]
        if how == "dies":
            raise RouterError(self.kind, f"{address} is unavailable")
        yield Delta("req-1", (1,), "a", (), None)
        if how == "dies-mid-stream":
            raise RouterError(ErrorKind.UNAVAILABLE, f"{address} died mid-stream")
        yield Delta("req-1", (2,), "b", (), None)

    def reroute(self, avoid: frozenset[str]) -> RouteDecision:
        self.avoided.append(avoid)
        left = sorted(a for a in self.behaviour if a not in avoid)
        if not left:
            raise RouterError(ErrorKind.UNAVAILABLE, "no live decode instance")
        return _route(left[0])


def _collect(pool: Pool, first: str, max_attempts: int) -> tuple[list[Delta], list[str]]:
    retried: list[str] = []

    async def run() -> list[Delta]:
        it = with_retries(
            pool.run, pool.reroute, _route(first), max_attempts, lambda e: retried.append(e.message)
        )
        return [d async for d in it]

    return asyncio.run(run()), retried


def test_a_failure_before_the_first_token_is_retried_elsewhere() -> None:
    pool = Pool({"a": "dies", "b": "streams", "c": "streams"})
    deltas, retried = _collect(pool, "a", max_attempts=2)
    assert [d.text for d in deltas] == ["a", "b"]
    assert pool.runs == ["a", "b"] and pool.avoided == [frozenset({"a"})]
    assert retried == ["a is unavailable"]


def test_attempts_are_bounded_and_each_avoids_every_instance_tried() -> None:
    pool = Pool({"a": "dies", "b": "dies", "c": "dies", "d": "streams"})
    with pytest.raises(RouterError, match="c is unavailable"):
        _collect(pool, "a", max_attempts=3)
    assert pool.runs == ["a", "b", "c"]
    assert pool.avoided == [frozenset({"a"}), frozenset({"a", "b"})]


def test_no_retry_after_a_delta_reached_the_client() -> None:
    pool = Pool({"a": "dies-mid-stream", "b": "streams"})
    with pytest.raises(RouterError, match="mid-stream"):
        _collect(pool, "a", max_attempts=2)
    assert pool.runs == ["a"]


def test_only_unavailable_is_retried() -> None:
    pool = Pool({"a": "dies", "b": "streams"}, kind=ErrorKind.INVALID_ARGUMENT)
    with pytest.raises(RouterError) as e:
        _collect(pool, "a", max_attempts=2)
    assert e.value.kind is ErrorKind.INVALID_ARGUMENT and pool.runs == ["a"]


def test_with_nowhere_else_to_go_the_first_error_stands() -> None:
    pool = Pool({"a": "dies"})
    with pytest.raises(RouterError, match="a is unavailable"):
        _collect(pool, "a", max_attempts=2)
    assert pool.runs == ["a"]


def test_one_attempt_means_no_retry() -> None:
    pool = Pool({"a": "dies", "b": "streams"})
    with pytest.raises(RouterError, match="a is unavailable"):
        _collect(pool, "a", max_attempts=1)
    assert pool.runs == ["a"] and pool.avoided == []
