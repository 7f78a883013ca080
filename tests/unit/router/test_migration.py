"""Migration mid-stream without Ray: fake decode instances behind the real `Dispatcher`
and `with_migration`; one breaks after k tokens and the stream goes on elsewhere. The
client's stream has every token once, in order, with its text; the moves are bounded,
counted and in the final timings; each test ends with the leak check."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from fake_serve import (
    FakeDecode,
    FakeDecodePool,
    FakePrefill,
    FakeTransfers,
    assert_idle,
    settle,
    text_of,
)
from ray.exceptions import ActorDiedError

from engine import SamplingParams
from router.cluster_view import ClusterView
from router.dispatch import Dispatcher, DispatchTimeouts
from router.drain import StoppedReplicas
from router.errors import ErrorKind, RouterError
from router.metrics import RouterMetrics
from router.migration import MigrationPolicy, Progress, with_migration
from router.policy import Candidate, RouteDecision
from router.results import Delta
from router.validation import ValidRequest

TIMEOUTS = DispatchTimeouts(
    dispatch_s=2.0, stream_idle_s=2.0, prefill_s=1.0, transfer_s=0.5, abort_s=1.0
)
OUTPUT = tuple(range(500, 510))
REQ = ValidRequest(tuple(range(100, 140)), SamplingParams(max_tokens=len(OUTPUT)), "tag")
THRESHOLD = 44  # prompt (40) + tokens so far at or above it go to the prefill pool


@dataclass
class Rig:
    transfers: FakeTransfers
    decodes: list[FakeDecode]
    prefill: FakePrefill
    view: ClusterView
    metrics: RouterMetrics
    dispatcher: Dispatcher
    reroutes: list[tuple[frozenset[str], int]]

    def route(self, avoid: frozenset[str], progress: Progress) -> RouteDecision:
        """The first decode instance not avoided; the prefill pool above THRESHOLD."""
        self.reroutes.append((avoid, len(progress.token_ids)))
        left = [d for d in self.decodes if d.address not in avoid]
        if not left:
            raise RouterError(ErrorKind.UNAVAILABLE, "no live decode instance")
        n = len(REQ.prompt_token_ids) + len(progress.token_ids)
        d = Candidate(left[0].name, left[0].address, 0, 0, 100)
        p = Candidate(self.prefill.name, self.prefill.address, 0, 0, 100)
        return RouteDecision(d, p if n >= THRESHOLD else None, n)

    async def collect(self, max_migrations: int = 2, start: Progress | None = None) -> list[Delta]:
        return [d async for d in self.stream(max_migrations, start)]

    def stream(self, max_migrations: int, start: Progress | None = None) -> AsyncIterator[Delta]:
        loop = asyncio.get_running_loop()
        arrival = loop.time()
        policy = MigrationPolicy(
            max_migrations,
            2,
            lambda e: self.metrics.retries.labels(e.kind.value).inc(),
            lambda e: self.metrics.migrations.labels(e.kind.value).inc(),
        )
        first = self.route(frozenset(), start or Progress())
        self.reroutes.clear()
        return with_migration(
            lambda r, p: self.dispatcher.run("r1", REQ, r, arrival, 0.0, p),
            self.route,
            first,
            policy,
            start,
        )

    def counted(self, name: str, reason: str = "unavailable") -> float:
        sample = self.metrics.registry.get_sample_value(f"{name}_total", {"reason": reason})
        return sample or 0.0

    async def assert_clean(self) -> None:
        for _ in range(100):
            await settle(self.prefill, *self.decodes)
            if not self.dispatcher.num_pending:
                break
            await asyncio.sleep(0.01)
        assert self.dispatcher.num_pending == 0, "dispatch tasks still running"
        assert_idle(self.transfers, self.prefill, *self.decodes)
        assert self.view.num_sent == 0, "requests still in flight in the cluster view"


def _rig(n_decode: int = 3, stopped: StoppedReplicas | None = None) -> Rig:
    transfers = FakeTransfers()
    decodes = [FakeDecode(transfers, f"decode-{i}") for i in range(n_decode)]
    for d in decodes:
        d.behaviour.tokens = OUTPUT
    prefill = FakePrefill(transfers)
    view = ClusterView(None, 1.0)  # type: ignore[arg-type]  # sent/done need no registry
    metrics = RouterMetrics()
    pool = FakeDecodePool(*decodes)
    dispatcher = Dispatcher(pool, prefill, view, TIMEOUTS, metrics, stopped)
    return Rig(transfers, decodes, prefill, view, metrics, dispatcher, [])


def _die(d: FakeDecode, after: int, error: BaseException | None = None) -> None:
    d.behaviour.die_after = after
    d.behaviour.die_with = error or ActorDiedError()


def _tokens(deltas: list[Delta]) -> tuple[int, ...]:
    return tuple(t for d in deltas for t in d.token_ids)


@pytest.mark.parametrize("k", [1, 3, 9])
def test_a_stream_that_breaks_after_k_tokens_goes_on_elsewhere(k: int) -> None:
    async def run() -> None:
        rig = _rig()
        _die(rig.decodes[0], k)
        deltas = await rig.collect()
        assert _tokens(deltas) == OUTPUT  # none twice, none missing, in order
        assert "".join(d.text for d in deltas) == text_of(OUTPUT)
        assert {d.request_id for d in deltas} == {"r1"}  # one stream for the client
        finish = deltas[-1].finish
        assert finish is not None and finish.timings.migrations == 1
        assert finish.usage.completion_tokens == len(OUTPUT)
        (resumed,) = rig.decodes[1].requests
        assert resumed.resume is not None and resumed.resume.output_token_ids == OUTPUT[:k]
        assert resumed.request_id == "r1-m1"  # an id of its own on the instances
        # the prompt and tokens so far reach the threshold: their prefill is remote
        assert (resumed.remote is not None) == (40 + k >= THRESHOLD)
        assert rig.reroutes == [(frozenset({"decode-0-replica"}), k)]
        assert (
            rig.counted("pdserve_stream_migrations") == 1
            and rig.counted("pdserve_request_retries") == 0
        )
        await rig.assert_clean()

    asyncio.run(run())


def test_moves_are_bounded_and_the_last_error_ends_the_stream() -> None:
    async def run() -> None:
        rig = _rig(4)
        for d in rig.decodes:
            _die(d, 1)
        got: list[Delta] = []
        with pytest.raises(RouterError) as e:
            async for delta in rig.stream(max_migrations=2):
                got.append(delta)
        assert e.value.kind is ErrorKind.UNAVAILABLE
        assert _tokens(got) == OUTPUT[:3]  # one token from each of three instances
        assert [len(d.requests) for d in rig.decodes] == [1, 1, 1, 0]
        assert rig.counted("pdserve_stream_migrations") == 2
        await rig.assert_clean()

    asyncio.run(run())


def test_without_moves_a_mid_stream_error_ends_the_stream() -> None:
    async def run() -> None:
        rig = _rig()
        _die(rig.decodes[0], 2)
        with pytest.raises(RouterError):
            await rig.collect(max_migrations=0)
        assert rig.decodes[1].requests == [] and rig.counted("pdserve_stream_migrations") == 0
        await rig.assert_clean()

    asyncio.run(run())


def test_a_request_error_is_not_migrated() -> None:
    async def run() -> None:
        rig = _rig()
        _die(rig.decodes[0], 2, ValueError("max_tokens: must be >= 1"))
        with pytest.raises(RouterError) as e:
            await rig.collect()
        assert e.value.kind is ErrorKind.INVALID_ARGUMENT
        assert rig.decodes[1].requests == []
        await rig.assert_clean()

    asyncio.run(run())


def test_a_resumed_segment_that_fails_before_its_first_token_is_retried() -> None:
    async def run() -> None:
        rig = _rig()
        _die(rig.decodes[0], 4)
        rig.decodes[1].behaviour.fail_before_first = ActorDiedError()
        deltas = await rig.collect()
        assert _tokens(deltas) == OUTPUT
        assert rig.counted("pdserve_stream_migrations") == 1
        assert rig.counted("pdserve_request_retries") == 1
        (resumed,) = rig.decodes[2].requests
        assert resumed.resume is not None and resumed.resume.output_token_ids == OUTPUT[:4]
        # the retry avoided the instance that broke the stream and the one that failed
        assert rig.reroutes[-1] == (frozenset({"decode-0-replica", "decode-1-replica"}), 4)
        await rig.assert_clean()

    asyncio.run(run())


def test_an_internal_failure_of_the_instance_migrates_too() -> None:
    async def run() -> None:
        rig = _rig()
        _die(rig.decodes[0], 5, RuntimeError("engine thread failed"))
        deltas = await rig.collect()
        assert _tokens(deltas) == OUTPUT
        assert rig.counted("pdserve_stream_migrations", "internal") == 1
        await rig.assert_clean()

    asyncio.run(run())


def test_a_stream_on_a_replica_serve_stops_moves_after_the_grace() -> None:
    async def run() -> None:
        stopped = StoppedReplicas(grace_s=0.1)
        rig = _rig(2, stopped)
        rig.decodes[0].behaviour.chunk_delay_s = 0.03  # 0.3 s for the whole output
        got: list[Delta] = []
        async for delta in rig.stream(max_migrations=2):
            got.append(delta)
            if len(got) == 2:
                stopped.stopped("decode-0-replica")  # Serve dropped it: draining
        assert _tokens(got) == OUTPUT
        assert "".join(d.text for d in got) == text_of(OUTPUT)
        assert got[-1].finish is not None and got[-1].finish.timings.migrations == 1
        (moved,) = rig.decodes[1].requests
        assert moved.resume is not None and 2 <= len(moved.resume.output_token_ids) < 8
        # the old stream was cancelled and its request aborted on the stopping replica
        assert rig.decodes[0].streams[0].cancelled and rig.decodes[0].aborted == ["r1"]
        await rig.assert_clean()

    asyncio.run(run())


def test_a_stream_that_ends_within_the_grace_stays() -> None:
    async def run() -> None:
        stopped = StoppedReplicas(grace_s=5.0)
        stopped.stopped("decode-0-replica")
        rig = _rig(2, stopped)
        deltas = await rig.collect()
        assert _tokens(deltas) == OUTPUT and rig.decodes[1].requests == []
        assert rig.counted("pdserve_stream_migrations") == 0
        await rig.assert_clean()

    asyncio.run(run())


def test_stopped_replicas_keep_the_first_drop_time() -> None:
    now = [100.0]
    stopped = StoppedReplicas(grace_s=4.0, clock=lambda: now[0])
    assert stopped.deadline("a") is None
    stopped.stopped("a")
    now[0] = 102.0
    stopped.stopped("a")  # reported again by another handle's router
    assert stopped.deadline("a") == 104.0
    with pytest.raises(ValueError, match="grace_s"):
        StoppedReplicas(grace_s=0)


@pytest.mark.parametrize("breaks_again", [False, True])
def test_a_stream_the_client_continues_goes_on_after_its_tokens(breaks_again: bool) -> None:
    """A request with `resume` (the client continues a stream a dead router carried):
    the instances compute the prompt and those tokens, and the stream goes on after
    them; should it break again, it moves with all of them."""

    async def run() -> None:
        rig = _rig()
        if breaks_again:
            _die(rig.decodes[0], 2)
        have = OUTPUT[:4]
        start = Progress(have, len(text_of(have)))
        deltas = await rig.collect(start=start)
        assert have + _tokens(deltas) == OUTPUT
        assert text_of(have) + "".join(d.text for d in deltas) == text_of(OUTPUT)
        first = rig.decodes[0].requests[0]
        assert first.resume is not None and first.resume.output_token_ids == have
        assert first.request_id == "r1"
        finish = deltas[-1].finish
        assert finish is not None and finish.usage.completion_tokens == len(OUTPUT)
        if breaks_again:
            (moved,) = rig.decodes[1].requests
            assert moved.resume is not None and moved.resume.output_token_ids == OUTPUT[:6]
        await rig.assert_clean()

    asyncio.run(run())
