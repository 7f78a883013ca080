"""Running one routed request against the pools, through pinned Serve handles.

Colocated path (the policy chose no prefill instance):

    decode.generate(request)              TokenChunks; each becomes a Delta

Disaggregated path: both calls go out at once, with the transfer id and the plan the
router assigned.

    decode.generate(request + plan)       the decode instance holds blocks for the
                                          prompt and registers the transfer; once its KV
                                          and first token land it streams TokenChunks,
                                          as on the colocated path. A transfer that fails
                                          or is late, or no room for it, makes it prefill
                                          the prompt itself (a counted fallback, which
                                          the final chunk names)
    prefill.prefill(...)                  computes the prompt and pushes its KV and
                                          first token to the decode instance; its result
                                          only feeds metrics and the final timings

The router only relays the decode stream. Cleanup (router.cleanup): unless the stream
finished, the decode stream is cancelled and `abort` goes to every instance involved,
in a background task with a bound, so blocks and transfers are freed even when the
client's cancellation interrupts a call; a failed prefill is aborted the same way, and
while the stream runs the decode instance is told (`prefill_failed`), so that it
recomputes the prompt at once instead of waiting out the transfer's timeout. Every wait on
a pool is bounded: the first chunk by `dispatch_timeout_s` (colocated) or
`stream_idle_timeout_s` (disaggregated: it follows the transfer), each later one by
`stream_idle_timeout_s`, the prefill by `prefill_timeout_s`. A stream on a decode
replica that Serve is stopping is relayed until its drain deadline (router.drain), then
ends with UNAVAILABLE so that it moves. With a `Progress` (router.migration) the
request continues a stream: the instances get the tokens so far with the prompt, under
a request id of the segment's own.

Spans, under the request's root span: `dispatch` (one attempt), and under it
`prefill.call` (the prefill call, whose context the prefill replica's spans hang
under), `decode.wait` (sending the decode request to its first token: the wait for
the decode stream) and `decode.stream` (the first token to the last chunk). The decode
request carries the `dispatch` span's context.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from opentelemetry.trace import INVALID_SPAN, Span

from kv_transfer.base import Parallelism
from router.cleanup import Cleanups
from router.cluster_view import ClusterView
from router.drain import StoppedReplicas
from router.errors import ErrorKind, RouterError
from router.metrics import RouterMetrics
from router.migration import Progress
from router.pinning import PIN_KWARG
from router.policy import RouteDecision
from router.results import Delta, Finish, Timings, Usage
from router.validation import ValidRequest
from router.worker_errors import worker_error
from telemetry import tracing
from worker.messages import (
    PrefillOutcome,
    PrefillRequest,
    RemotePrefillPlan,
    TokenChunk,
    WorkerRequest,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DispatchTimeouts:
    dispatch_s: float  # until a pool's first answer
    stream_idle_s: float  # between two chunks of a stream
    prefill_s: float  # a whole remote prefill
    transfer_s: float  # the KV transfer's own deadline (both roles)
    abort_s: float = 10.0
    drain_s: float = 15.0  # a stream on a replica Serve is stopping, before it moves


@dataclass
class _Call:
    """One request's calls in flight: the decode stream and, disaggregated, the prefill."""

    rid: str  # the client's request id
    wid: str  # the request id the instances see (one per migration segment)
    route: RouteDecision
    arrival: float  # time.monotonic() at the router
    stream: Any  # the decode stream (a Serve response generator)
    prefill: asyncio.Task[PrefillOutcome] | None = None
    finished: bool = False
    closed: bool = False
    first_at: float | None = None  # time.monotonic() of the first token
    span: Span = INVALID_SPAN  # this attempt's `dispatch` span
    phase: Span = INVALID_SPAN  # decode.wait, then decode.stream

    @property
    def prefill_failed(self) -> bool:
        p = self.prefill
        return p is not None and p.done() and not p.cancelled() and not p.result().ok

    @property
    def decode_pin(self) -> str:
        return self.route.decode.address

    @property
    def prefill_pin(self) -> str | None:
        p = self.route.prefill
        return p.address if p is not None and self.prefill is not None else None


class Dispatcher:
    def __init__(
        self,
        decode: Any,
        prefill: Any | None,
        view: ClusterView,
        timeouts: DispatchTimeouts,
        metrics: RouterMetrics,
        stopped: StoppedReplicas | None = None,
        pools: Mapping[str, Any] | None = None,
    ) -> None:
        self._decode = decode  # DeploymentHandle of the decode (or colocated) pool
        self._prefill = prefill  # DeploymentHandle of the prefill pool, if any
        # Every pool's handle by name: a switchable instance flipped to the other role
        # is still reached through its own pool's deployment.
        self._pools = dict(pools or {})
        self._streams = {name: h.options(stream=True) for name, h in self._pools.items()}
        self._decode_stream = decode.options(stream=True)
        self._view = view
        self._t = timeouts
        self._metrics = metrics
        self._stopped = stopped  # replicas Serve is stopping (router.drain)
        self._cleanups = Cleanups(decode, prefill, self._pools, timeouts.abort_s)
        self._prefills: set[asyncio.Task[PrefillOutcome]] = set()

    async def run(
        self,
        rid: str,
        req: ValidRequest,
        route: RouteDecision,
        arrival: float,
        arrival_wall: float,
        progress: Progress | None = None,
        parent: Span = INVALID_SPAN,
    ) -> AsyncIterator[Delta]:
        """Stream the request's deltas; `arrival` is its time.monotonic() at the router,
        `parent` the request's span. With `progress` (router.migration), the tokens the
        client has are computed with the prompt and the stream goes on after them."""
        span = tracing.start("dispatch", parent, {"decode": route.decode.instance_id})
        progress = progress or Progress()
        if progress.migrations:
            span.set_attribute("migration", progress.migrations)
        call = self._start(rid, req, route, arrival, arrival_wall, progress, span)
        error = ""
        try:
            async for delta in self._relay(call):
                yield delta
        except BaseException as e:
            error = e.message if isinstance(e, RouterError) else type(e).__name__
            raise
        finally:
            tracing.end(call.phase, error)
            tracing.end(span, error)
            self._close(call)

    def _start(
        self,
        rid: str,
        req: ValidRequest,
        route: RouteDecision,
        arrival: float,
        wall: float,
        progress: Progress,
        span: Span,
    ) -> _Call:
        """Send the decode request and, disaggregated, the prefill, at the same time."""
        remote = route.prefill if self._prefill is not None else None
        plan = self._plan(remote) if remote is not None else None
        resume = progress.resume
        n_prompt = len(req.prompt_token_ids) + len(progress.token_ids)
        wid = f"{rid}-m{progress.migrations}" if progress.migrations else rid
        trace = tracing.context_of(span)
        wreq = WorkerRequest(wid, req.prompt_token_ids, req.params, wall, plan, resume, trace=trace)
        self._view.sent(route.decode.instance_id, wid, 0 if plan else n_prompt)
        phase = tracing.start("decode.wait", span)
        handle = self._streams.get(route.decode.pool, self._decode_stream)
        stream = handle.generate.remote(wreq, **{PIN_KWARG: route.decode.address})
        call = _Call(
            rid, wid, route, arrival, stream, first_at=progress.first_at, span=span, phase=phase
        )
        if plan is not None and remote is not None:
            self._view.sent(remote.instance_id, wid, n_prompt)
            span.set_attribute("prefill", remote.instance_id)
            prefill_span = tracing.start("prefill.call", span, {"prefill": remote.instance_id})
            preq = PrefillRequest(
                wid,
                plan.transfer_id,
                req.prompt_token_ids,
                req.params,
                route.decode.instance_id,
                plan.timeout_s,
                Parallelism(route.decode.tp, route.decode.pp),
                resume,
                trace=tracing.context_of(prefill_span),
            )
            call.prefill = asyncio.get_running_loop().create_task(
                self._run_prefill(call, preq, prefill_span)
            )
            self._prefills.add(call.prefill)
            call.prefill.add_done_callback(self._prefills.discard)
        return call

    def _plan(self, remote: Any) -> RemotePrefillPlan:
        return RemotePrefillPlan(
            f"xfer-{uuid.uuid4().hex}",
            remote.instance_id,
            self._t.transfer_s,
            Parallelism(remote.tp, remote.pp),
        )

    async def _relay(self, call: _Call) -> AsyncIterator[Delta]:
        """The decode stream's chunks as deltas, until the finished one."""
        it = call.stream.__aiter__()
        timeout = self._t.dispatch_s if call.prefill is None else self._t.stream_idle_s
        while not call.finished:
            item = await self._chunk(call, it, timeout)
            timeout = self._t.stream_idle_s
            if not isinstance(item, TokenChunk):
                raise RouterError(ErrorKind.INTERNAL, f"unexpected {type(item).__name__}")
            if item.token_ids and call.first_at is None:
                call.first_at = time.monotonic()
                tracing.end(call.phase)
                call.phase = tracing.start("decode.stream", call.span)
            if not item.finished:
                yield Delta(call.rid, item.token_ids, item.text, item.logprobs)
                continue
            async for delta in self._last(call, item):
                yield delta

    async def _last(self, call: _Call, item: TokenChunk) -> AsyncIterator[Delta]:
        """The finished chunk. A disaggregated request's Finish takes the prefill's
        timings: when they are not in yet, the tokens go first and the Finish follows."""
        disagg = item.final is not None and item.final.disaggregated
        if disagg and call.prefill is not None and not call.prefill.done() and item.token_ids:
            yield Delta(call.rid, item.token_ids, item.text, item.logprobs)
            item = TokenChunk((), "", (), True, item.finish_reason, item.stop_reason, item.final)
        outcome = await self._outcome(call) if disagg else None
        call.finished = True
        finish = self._finish(item, outcome, call)
        yield Delta(call.rid, item.token_ids, item.text, item.logprobs, finish)

    async def _chunk(self, call: _Call, it: Any, timeout: float) -> Any:
        """The stream's next chunk. On a replica Serve is stopping (router.drain), it is
        waited for only until the stream must move: then UNAVAILABLE, which migrates."""
        what, pin = "the decode instance", call.decode_pin
        deadline = self._stopped.deadline(pin) if self._stopped is not None else None
        if deadline is None or deadline - time.monotonic() >= timeout:
            return await self._next(it, timeout, what, pin)
        moving = RouterError(ErrorKind.UNAVAILABLE, f"{what} is shutting down: the stream moves")
        left = deadline - time.monotonic()
        if left <= 0:
            raise moving
        return await self._next(it, left, what, pin, late=moving)

    async def _next(
        self, it: Any, timeout: float, what: str, pin: str, late: RouterError | None = None
    ) -> Any:
        """The next item of `it`; after `timeout`, `late` if given, else UNAVAILABLE and
        the instance is reported as failed."""
        try:
            return await asyncio.wait_for(it.__anext__(), timeout)
        except StopAsyncIteration:
            raise RouterError(ErrorKind.INTERNAL, f"{what} ended the stream early") from None
        except Exception as e:
            if late is not None and isinstance(e, TimeoutError):
                raise late from None
            self._view.failed(pin, e, what)
            raise worker_error(e, what) from e

    async def _run_prefill(
        self, call: _Call, preq: PrefillRequest, span: Span = INVALID_SPAN
    ) -> PrefillOutcome:
        """The prefill call, bounded; its failure is an outcome: the decode instance
        is told to recompute the prompt, and the prefill instance to abort."""
        assert self._prefill is not None and call.route.prefill is not None
        target = call.route.prefill
        pin = target.address
        handle = self._cleanups.handle(target, self._prefill)
        out: PrefillOutcome | None = None
        try:
            out = await asyncio.wait_for(
                handle.prefill.remote(preq, **{PIN_KWARG: pin}), self._t.prefill_s
            )
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._view.failed(pin, e, "the prefill instance")
            out = PrefillOutcome(ok=False, reason=worker_error(e, "the prefill instance").message)
        finally:
            self._view.done(call.route.prefill.instance_id, call.wid)
            tracing.end(span, "cancelled" if out is None else out.reason if not out.ok else "")
        assert out is not None  # only a cancellation leaves it unset, and that raised
        if not out.ok:
            logger.warning("request %s: prefill failed: %s", call.wid, out.reason)
            self._metrics.prefill_failures.inc()
            if call.closed:  # the stream is over: nobody else will clean up
                self._cleanups.abort(call.wid, None, target)
            else:  # its KV will not come: the decode instance need not wait for it
                self._cleanups.prefill_failed(call.wid, call.route.decode, out.reason)
        return out

    async def _outcome(self, call: _Call) -> PrefillOutcome | None:
        """The prefill's outcome for the final timings: normally in by the time the
        stream ends (the first token went out with the KV); bounded otherwise."""
        if call.prefill is None:
            return None
        try:
            return await asyncio.wait_for(asyncio.shield(call.prefill), self._t.abort_s)
        except TimeoutError:
            return None

    def _close(self, call: _Call) -> None:
        """Unless the stream finished, cancel it and abort the request on every instance
        involved; a prefill that failed is aborted either way."""
        call.closed = True
        self._view.done(call.route.decode.instance_id, call.wid)
        running = call.prefill is not None and not call.prefill.done()
        prefill = call.route.prefill if call.prefill_pin is not None else None
        prefill = prefill if running or call.prefill_failed else None
        if call.finished:
            if call.prefill_failed:
                self._cleanups.abort(call.wid, None, prefill)
            return
        call.stream.cancel()
        if running and call.prefill is not None:
            call.prefill.cancel()
        self._cleanups.abort(call.wid, call.route.decode, prefill)

    @property
    def num_pending(self) -> int:
        """Prefill calls and cleanups still running (for leak checks)."""
        return len(self._prefills) + self._cleanups.num_pending

    def _finish(self, item: TokenChunk, outcome: PrefillOutcome | None, call: _Call) -> Finish:
        final = item.final
        if final is None:
            raise RouterError(ErrorKind.INTERNAL, "the last chunk carried no stats")
        if final.fallback is not None:
            self._metrics.fallback(final.fallback)
        disagg = final.disaggregated
        remote = outcome if disagg and outcome is not None and outcome.ok else None
        prefill_s = remote.prefill_s if remote is not None else final.prefill_s
        cached = remote.cached_prompt_tokens if remote is not None else final.cached_prompt_tokens
        # The prefill instance measures the transfer on one clock; the decode
        # instance's figure spans two hosts' wall clocks.
        kv_s = remote.kv_transfer_s if remote is not None else final.kv_transfer_s
        kv_s = kv_s if disagg else 0.0
        first_at = call.first_at if call.first_at is not None else time.monotonic()
        ttft = (first_at - call.arrival) * 1000
        timings = Timings(
            queue_ms=max(0.0, ttft - prefill_s * 1000 - kv_s * 1000),
            prefill_ms=prefill_s * 1000,
            kv_transfer_ms=kv_s * 1000,
            ttft_ms=ttft,
            mean_tpot_ms=final.tpot_s * 1000,
            disaggregated=disagg,
        )
        usage = Usage(final.prompt_tokens, final.completion_tokens, cached)
        return Finish(item.finish_reason or "stop", item.stop_reason, usage, timings)
