"""The router's dispatch without Ray: fake decode and prefill pools (tests/fake_serve.py)
behind the real `Dispatcher`, with a failure injected at each point. Every test ends
with the leak check: no request left on either fake pool, no transfer registered, no
dispatch task running and nothing left in flight in the cluster view."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, replace

import pytest
from fake_serve import FakeDecode, FakePrefill, FakeTransfers, assert_idle, settle
from ray.exceptions import ActorDiedError

from engine import SamplingParams
from router.cluster_view import ClusterView
from router.dispatch import Dispatcher, DispatchTimeouts
from router.errors import ErrorKind, RouterError
from router.metrics import RouterMetrics
from router.policy import Candidate, RouteDecision
from router.results import Delta
from router.validation import ValidRequest

TIMEOUTS = DispatchTimeouts(
    dispatch_s=2.0, stream_idle_s=2.0, prefill_s=1.0, transfer_s=0.2, abort_s=1.0
)
REQ = ValidRequest(tuple(range(100, 260)), SamplingParams(max_tokens=3), "tag")


@dataclass
class Rig:
    transfers: FakeTransfers
    decode: FakeDecode
    prefill: FakePrefill
    view: ClusterView
    metrics: RouterMetrics
    dispatcher: Dispatcher

    def route(self, disaggregated: bool = True) -> RouteDecision:
        d = Candidate(self.decode.name, self.decode.address, 0, 0, 100)
        p = Candidate(self.prefill.name, self.prefill.address, 0, 0, 100)
        return RouteDecision(d, p if disaggregated else None, len(REQ.prompt_token_ids))

    async def collect(self, disaggregated: bool = True) -> list[Delta]:
        route = self.route(disaggregated)
        loop = asyncio.get_running_loop()
        return [d async for d in self.dispatcher.run("r1", REQ, route, loop.time(), 0.0)]

    async def assert_clean(self) -> None:
        await settle(self.decode, self.prefill)
        for _ in range(100):  # the dispatcher's own cleanups and prefill calls
            if not self.dispatcher.num_pending:
                break
            await asyncio.sleep(0.01)
        assert self.dispatcher.num_pending == 0, "dispatch tasks still running"
        await settle(self.decode, self.prefill)
        assert_idle(self.transfers, self.decode, self.prefill)
        assert self.view.num_sent == 0, "requests still in flight in the cluster view"

    def fallbacks(self, reason: str) -> float:
        name = "pdserve_remote_prefill_fallbacks_total"
        return self.metrics.registry.get_sample_value(name, {"reason": reason}) or 0.0

    def prefill_failures(self) -> float:
        name = "pdserve_prefill_failures_total"
        return self.metrics.registry.get_sample_value(name) or 0.0


def _rig(timeouts: DispatchTimeouts = TIMEOUTS) -> Rig:
    transfers = FakeTransfers()
    decode, prefill = FakeDecode(transfers), FakePrefill(transfers)
    view = ClusterView(None, 1.0)  # type: ignore[arg-type]  # sent/done need no registry
    metrics = RouterMetrics()
    dispatcher = Dispatcher(decode, prefill, view, timeouts, metrics)
    return Rig(transfers, decode, prefill, view, metrics, dispatcher)


def _tokens(deltas: list[Delta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


def test_colocated_streams_the_decode_pool_only() -> None:
    async def run() -> None:
        rig = _rig()
        deltas = await rig.collect(disaggregated=False)
        assert _tokens(deltas) == [5, 6, 7]
        finish = deltas[-1].finish
        assert finish is not None and not finish.timings.disaggregated
        assert rig.decode.calls == ["generate"] and rig.prefill.calls == []
        await rig.assert_clean()

    asyncio.run(run())


@pytest.mark.parametrize("prefill_delay_s", [0.0, 0.05], ids=["prefill_first", "decode_first"])
def test_disaggregated_makes_two_pool_calls_at_once(prefill_delay_s: float) -> None:
    async def run() -> None:
        rig = _rig()
        rig.prefill.behaviour.delay_s = prefill_delay_s
        deltas = await rig.collect()
        assert _tokens(deltas) == [5, 6, 7]
        # Exactly two pool calls, the prefill's sent before any chunk came back.
        assert rig.decode.calls == ["generate"] and rig.prefill.calls == ["prefill"]
        finish = deltas[-1].finish
        assert finish is not None and finish.timings.disaggregated
        assert finish.timings.prefill_ms == pytest.approx(3.0)  # the prefill's own report
        # ... and so is the transfer's share of TTFT (one clock), not the decode's
        assert finish.timings.kv_transfer_ms == pytest.approx(1.0)
        assert rig.fallbacks("transfer") == 0 and rig.prefill_failures() == 0
        await rig.assert_clean()
        assert rig.decode.aborted == [] and rig.prefill.aborted == []

    asyncio.run(run())


def test_decode_failing_before_its_first_chunk_aborts_both() -> None:
    async def run() -> None:
        rig = _rig()
        rig.decode.behaviour.fail_before_first = ActorDiedError()
        rig.prefill.behaviour.delay_s = 0.2  # still computing when the decode fails
        with pytest.raises(RouterError) as e:
            await rig.collect()
        assert e.value.kind is ErrorKind.UNAVAILABLE
        await rig.assert_clean()
        assert rig.decode.aborted == ["r1"] and rig.prefill.aborted == ["r1"]
        assert all(s.cancelled for s in rig.decode.streams)

    asyncio.run(run())


@pytest.mark.parametrize("failure", ["raised", "died", "send_failed"])
def test_a_failed_prefill_is_counted_and_aborted_and_decode_recomputes_at_once(
    failure: str,
) -> None:
    """The router tells the decode instance, pinned, that the KV will not come: it
    recomputes the prompt then, not at the transfer's timeout (far beyond the test's
    streams' bound here, so only the notice can end the wait)."""

    async def run() -> None:
        rig = _rig(replace(TIMEOUTS, transfer_s=60.0))
        if failure == "send_failed":
            rig.prefill.behaviour.failed_send = True
        else:
            rig.prefill.behaviour.fail = (
                RuntimeError("boom") if failure == "raised" else (ActorDiedError())
            )
        deltas = await rig.collect()
        assert _tokens(deltas) == [5, 6, 7]  # the decode side recomputed the prompt
        finish = deltas[-1].finish
        assert finish is not None and not finish.timings.disaggregated
        assert rig.fallbacks("prefill_failed") == 1 and rig.fallbacks("transfer") == 0
        assert rig.prefill_failures() == 1
        assert rig.decode.told == ["r1"]
        assert rig.decode.calls == ["generate", "prefill_failed"]
        await rig.assert_clean()
        assert rig.prefill.aborted == ["r1"] and rig.decode.aborted == []

    asyncio.run(asyncio.wait_for(run(), 30.0))


def test_a_transfer_that_times_out_falls_back_and_the_stuck_prefill_is_aborted() -> None:
    async def run() -> None:
        rig = _rig(replace(TIMEOUTS, prefill_s=0.4))
        rig.prefill.behaviour.stall_s = 10.0  # never pushes, never answers in time
        deltas = await rig.collect()
        assert _tokens(deltas) == [5, 6, 7]
        finish = deltas[-1].finish
        assert finish is not None and not finish.timings.disaggregated
        assert rig.fallbacks("transfer") == 1
        await rig.assert_clean()
        assert rig.prefill_failures() == 1 and rig.prefill.aborted == ["r1"]

    asyncio.run(run())


def test_a_refused_transfer_counts_as_decode_full() -> None:
    async def run() -> None:
        rig = _rig()
        rig.decode.behaviour.refuse = True
        rig.prefill.behaviour.refused = True
        deltas = await rig.collect()
        assert _tokens(deltas) == [5, 6, 7]
        assert rig.fallbacks("decode_full") == 1
        await rig.assert_clean()

    asyncio.run(run())


@pytest.mark.parametrize("prefill_running", [True, False], ids=["prefill_running", "prefill_done"])
def test_client_cancelling_mid_stream_cleans_up_everywhere(prefill_running: bool) -> None:
    async def run() -> None:
        rig = _rig()
        if prefill_running:  # the decode side got its KV, the prefill's answer is late
            rig.prefill.behaviour.answer_delay_s = 0.5
        gen = rig.dispatcher.run("r1", REQ, rig.route(), asyncio.get_running_loop().time(), 0.0)
        first = await gen.__anext__()
        assert first.token_ids == (5,) and first.finish is None
        await gen.aclose()  # the client went away
        await rig.assert_clean()
        assert rig.decode.aborted == ["r1"] and all(s.cancelled for s in rig.decode.streams)
        # A prefill still running is cancelled and aborted; one that succeeded is not.
        assert rig.prefill.aborted == (["r1"] if prefill_running else [])

    asyncio.run(run())


def test_client_cancelling_before_the_kv_lands_aborts_the_prefill_too() -> None:
    async def run() -> None:
        rig = _rig()
        rig.prefill.behaviour.delay_s = 0.5
        gen = rig.dispatcher.run("r1", REQ, rig.route(), asyncio.get_running_loop().time(), 0.0)
        waiting = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0.05)
        waiting.cancel()  # the client cancelled while the decode waited for its KV
        with pytest.raises(asyncio.CancelledError):
            await waiting
        await gen.aclose()
        await rig.assert_clean()
        assert rig.decode.aborted == ["r1"] and rig.prefill.aborted == ["r1"]

    asyncio.run(run())
