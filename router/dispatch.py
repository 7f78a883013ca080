"""Running one routed request against the pools, through pinned Serve handles.

Colocated path (the policy chose no prefill instance):

    decode.generate(request)              TokenChunks; each becomes a Delta

Disaggregated path:

    decode.generate(request + plan)       first item: Reserved. remote=False means the
                                          decode instance had no room for the transfer
                                          and prefills the prompt itself
    prefill.prefill(...)                  computes the prompt, pushes its KV into the
                                          reserved blocks, returns the first token
                                          (bounded; an error becomes a failed outcome)
    decode.complete_remote_prefill(...)   relays the outcome: the decode instance
                                          commits on DONE, or recomputes (a fallback)
    then TokenChunks as above

Cleanup: unless the stream finished, the decode stream is cancelled and `abort` goes to
every instance involved, in a background task with a bound, so blocks and transfers are
freed even when the client's cancellation interrupts a call. Every wait on a pool is
bounded: the first item by `dispatch_timeout_s`, each later one by
`stream_idle_timeout_s`, the prefill by `prefill_timeout_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from kv_transfer.base import Parallelism
from router.cluster_view import ClusterView
from router.errors import ErrorKind, RouterError
from router.metrics import RouterMetrics
from router.pinning import PIN_KWARG
from router.policy import RouteDecision
from router.results import Delta, Finish, Timings, Usage
from router.validation import ValidRequest
from router.worker_errors import worker_error
from worker.messages import (
    FallbackReason,
    PrefillOutcome,
    PrefillRequest,
    RemotePrefillPlan,
    Reserved,
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


class Dispatcher:
    def __init__(
        self,
        decode: Any,
        prefill: Any | None,
        view: ClusterView,
        timeouts: DispatchTimeouts,
        metrics: RouterMetrics,
    ) -> None:
        self._decode = decode  # DeploymentHandle of the decode (or colocated) pool
        self._decode_stream = decode.options(stream=True)
        self._prefill = prefill  # DeploymentHandle of the prefill pool, if any
        self._view = view
        self._t = timeouts
        self._metrics = metrics
        self._cleanups: set[asyncio.Task[None]] = set()

    async def run(
        self, rid: str, req: ValidRequest, route: RouteDecision, arrival: float, arrival_wall: float
    ) -> AsyncIterator[Delta]:
        """Stream the request's deltas; `arrival` is its time.monotonic() at the router."""
        n_prompt = len(req.prompt_token_ids)
        remote = route.prefill if self._prefill is not None else None
        plan = None
        if remote is not None:
            plan = RemotePrefillPlan(
                f"xfer-{uuid.uuid4().hex}",
                remote.instance_id,
                self._t.transfer_s,
                Parallelism(remote.tp, remote.pp),
            )
        wreq = WorkerRequest(rid, req.prompt_token_ids, req.params, arrival_wall, plan)
        decode_pin = route.decode.address
        self._view.sent(route.decode.instance_id, rid, 0 if plan else n_prompt)
        if remote is not None:
            self._view.sent(remote.instance_id, rid, n_prompt)
        stream = self._decode_stream.generate.remote(wreq, **{PIN_KWARG: decode_pin})
        it = stream.__aiter__()
        finished = False
        prefill_started = False
        outcome: PrefillOutcome | None = None
        try:
            if plan is not None and remote is not None:
                first = await self._next(it, self._t.dispatch_s, "the decode instance", decode_pin)
                if not isinstance(first, Reserved):
                    raise RouterError(
                        ErrorKind.INTERNAL, "decode stream did not start with Reserved"
                    )
                if first.remote:
                    prefill_started = True
                    outcome = await self._remote_prefill(rid, plan, req, remote.address, route)
                    await asyncio.wait_for(
                        self._decode.complete_remote_prefill.remote(
                            rid, outcome, **{PIN_KWARG: decode_pin}
                        ),
                        self._t.dispatch_s,
                    )
                else:
                    self._metrics.fallback(FallbackReason.DECODE_FULL)
                    logger.info("request %s prefills on decode: %s", rid, first.reason)
                self._view.done(remote.instance_id, rid)
            timeout = self._t.dispatch_s if plan is None else self._t.stream_idle_s
            first_at: float | None = None
            while True:
                item = await self._next(it, timeout, "the decode instance", decode_pin)
                timeout = self._t.stream_idle_s
                if not isinstance(item, TokenChunk):
                    raise RouterError(ErrorKind.INTERNAL, f"unexpected {type(item).__name__}")
                if item.token_ids and first_at is None:
                    first_at = time.monotonic()
                finish = None
                if item.finished:
                    finish = self._finish(item, outcome, arrival, first_at)
                    finished = True
                yield Delta(rid, item.token_ids, item.text, item.logprobs, finish)
                if finished:
                    return
        finally:
            self._view.done(route.decode.instance_id, rid)
            if remote is not None:
                self._view.done(remote.instance_id, rid)
            if not finished:
                stream.cancel()
                self._cleanup(
                    rid, decode_pin, remote.address if prefill_started and remote else None
                )

    async def _next(self, it: Any, timeout: float, what: str, pin: str) -> Any:
        try:
            return await asyncio.wait_for(it.__anext__(), timeout)
        except StopAsyncIteration:
            raise RouterError(ErrorKind.INTERNAL, f"{what} ended the stream early") from None
        except Exception as e:
            self._view.failed(pin, e, what)
            raise worker_error(e, what) from e

    async def _remote_prefill(
        self, rid: str, plan: RemotePrefillPlan, req: ValidRequest, pin: str, route: RouteDecision
    ) -> PrefillOutcome:
        assert self._prefill is not None
        preq = PrefillRequest(
            rid,
            plan.transfer_id,
            req.prompt_token_ids,
            req.params,
            route.decode.instance_id,
            plan.timeout_s,
            Parallelism(route.decode.tp, route.decode.pp),
        )
        try:
            out: PrefillOutcome = await asyncio.wait_for(
                self._prefill.prefill.remote(preq, **{PIN_KWARG: pin}), self._t.prefill_s
            )
            return out
        except asyncio.CancelledError:
            raise
        except Exception as e:
            self._view.failed(pin, e, "the prefill instance")
            logger.warning(
                "request %s: prefill failed: %s", rid, worker_error(e, "prefill").message
            )
            return PrefillOutcome(ok=False, reason=worker_error(e, "the prefill instance").message)

    def _finish(
        self,
        item: TokenChunk,
        outcome: PrefillOutcome | None,
        arrival: float,
        first_at: float | None,
    ) -> Finish:
        final = item.final
        if final is None:
            raise RouterError(ErrorKind.INTERNAL, "the last chunk carried no stats")
        if final.fallback is not None:
            self._metrics.fallback(final.fallback)
        disagg = final.disaggregated and outcome is not None and outcome.ok
        prefill_s = outcome.prefill_s if disagg and outcome is not None else final.prefill_s
        cached = (
            outcome.cached_prompt_tokens
            if disagg and outcome is not None
            else final.cached_prompt_tokens
        )
        kv_s = final.kv_transfer_s if disagg else 0.0
        ttft = ((first_at if first_at is not None else time.monotonic()) - arrival) * 1000
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

    def _cleanup(self, rid: str, decode_pin: str, prefill_pin: str | None) -> None:
        task = asyncio.get_running_loop().create_task(self._abort(rid, decode_pin, prefill_pin))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _abort(self, rid: str, decode_pin: str, prefill_pin: str | None) -> None:
        calls = [self._decode.abort.remote(rid, **{PIN_KWARG: decode_pin})]
        if prefill_pin is not None and self._prefill is not None:
            calls.append(self._prefill.abort.remote(rid, **{PIN_KWARG: prefill_pin}))
        for call in calls:
            try:
                await asyncio.wait_for(call, self._t.abort_s)
            except Exception as e:
                logger.warning("aborting %s: %s", rid, e)
