"""The prefill role's half of a replica: prefill a prompt and push its KV to a decode
instance. The prefill pool's replicas run one (`prefill_worker.deployment`), and so
does every switchable replica (`dual_worker`), whichever role it holds.

Lifecycle: `hooks = Pusher.hooks(settings)` go into the engine (`WorkerRuntime`'s
`layer_hook`, `output_hook` and `tick`) before it is built, with the pool's rank role
(`prefill_worker.rank_role`) for ranks 1..N-1; then `Pusher(runtime, hooks)` binds
the hook to a `KVSender` over the configured transport. `prefill()` is one request
(the steps are in `prefill_worker.deployment`'s docstring); `discard` (engine thread)
drops a request's transfer; `close()` closes the sender. A request the hook was not
given (a local prompt, a decode) passes through the hook untouched.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from opentelemetry.trace import Span

from engine import RequestOutput
from engine.block_pins import BlockPins
from kv_transfer.base import InstanceRef, SendSpec, TransferState, TransferStatus
from kv_transfer.end_waits import EndWaits
from kv_transfer.engine_hook import SendHook
from kv_transfer.sender import KVSender
from prefill_worker.rank_role import sender_connector
from telemetry import TraceContext, request_scope, tracing
from worker.engine_loop import COMMAND_TIMEOUT_S, OutputStream
from worker.kv_rank import local_rank, transfer_host
from worker.layer_spans import LayerSpans
from worker.messages import PrefillOutcome, PrefillRequest, WorkerSettings
from worker.ranks import RemoteRanks, combine
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)

_ABORTED_MEMORY_S = 120.0  # how long an abort that came before its prefill is kept
# A wait for rank 0's end re-checks the status at least this often (a lost wake-up
# costs at most this much).
_END_WAIT_S = 0.5
# Sends in flight end within their transport's operation timeout (then the pair is
# torn down); past this bound a transfer's pins are released regardless.
_UNREAD_TIMEOUT_S = 60.0
_UNREAD_POLL_S = 0.005  # with TP/PP, each poll asks every rank actor


async def release_when_unread(
    transfer_id: str,
    reading: Callable[[], Awaitable[bool]],
    release: Callable[[], object],
    timeout_s: float = _UNREAD_TIMEOUT_S,
    poll_s: float = _UNREAD_POLL_S,
) -> None:
    """Call `release` once `reading` says no sender reads the transfer's blocks, or
    after `timeout_s` (logged), or when `reading` fails (a rank that cannot answer
    reads nothing more); also when cancelled."""
    deadline = time.monotonic() + timeout_s
    try:
        while await reading():
            if time.monotonic() > deadline:
                logger.error(
                    "transfer %s: sends still read its blocks after %gs; unpinning them",
                    transfer_id,
                    timeout_s,
                )
                return
            await asyncio.sleep(poll_s)
    except Exception as e:
        logger.warning("transfer %s: unpinning without every rank: %s", transfer_id, e)
    finally:
        release()


def _outcome(final: RequestOutput, done: TransferStatus) -> PrefillOutcome:
    """A sent prefill's timings; the transfer's share is measured on this instance's
    clock, from the first token's sampling to the sends' completion."""
    m = final.metrics
    if m is None:
        return PrefillOutcome(ok=True)
    ended = done.ended_at if done.ended_at is not None else time.monotonic()
    return PrefillOutcome(
        ok=True,
        queue_s=m.queue_s,
        prefill_s=m.prefill_s,
        cached_prompt_tokens=m.num_cached_tokens,
        kv_transfer_s=max(0.0, ended - m.first_token_at),
    )


@dataclass(frozen=True)
class PushHooks:
    """What the engine is built with, before it exists: `spans` (the layer hook and the
    step tick, recording each request's layer spans around the send hook) and `send`
    (rank 0 samples the first token, which the transfer's END carries; its
    `on_outputs` is the engine's output hook)."""

    send: SendHook
    spans: LayerSpans


class Pusher:
    @staticmethod
    def hooks(settings: WorkerSettings) -> PushHooks:
        send = SendHook(settings.engine.block_size, first_token=True)
        return PushHooks(send, LayerSpans(send))

    def __init__(self, rt: WorkerRuntime, hooks: PushHooks) -> None:
        self._rt = rt
        self._ends = EndWaits()  # rank 0's sends end on the sender's threads
        self._hook = hooks.send
        self._spans = hooks.spans
        rendezvous = rt.rendezvous()
        settings = rt.settings
        connector = sender_connector(settings, rendezvous, transfer_host(settings.transfer_host))
        self.sender = KVSender(
            local_rank(settings, rt.instance_id, 0),
            rt.engine.kv_cache,
            rt.geometry,
            connector,
            registry=rendezvous,
            on_record=rt.transfer_metrics.record,
            on_end=self._ends.ended,
        )
        self._pins = BlockPins(rt.engine.block_pool)
        self._hook.bind(self.sender, self._pins)
        self._ranks: RemoteRanks | None = rt.ranks
        self._unpinning: set[asyncio.Task[None]] = set()
        self.pushed = 0  # prompts whose KV reached their decode instance
        self._aborted_early: dict[str, float] = {}  # request id -> time.monotonic()

    @property
    def num_requests(self) -> int:
        """Requests whose transfer the hook still streams or finishes."""
        return self._hook.num_requests

    # -- engine thread --------------------------------------------------------------------

    @staticmethod
    def _spec(req: PrefillRequest, trace: TraceContext | None) -> SendSpec:
        """`trace`: the span this request's sends are recorded under, on every rank."""
        dest = InstanceRef(req.dest_instance, req.dest_parallel)
        return SendSpec(req.transfer_id, dest, 0, req.timeout_s, trace)

    def _start(self, req: PrefillRequest, trace: TraceContext | None, since_ns: int) -> None:
        done = len(req.resume.output_token_ids) if req.resume is not None else 0
        params = dataclasses.replace(req.params, max_tokens=done + 1)  # one more token
        self._hook.add(req.request_id, self._spec(req, trace))
        self._spans.add(req.request_id, trace, since_ns)
        try:
            self._rt.engine.add_request(
                req.request_id, list(req.prompt_token_ids), params, req.resume
            )
        except BaseException:
            self._hook.discard(req.request_id, "request rejected")
            self._spans.discard(req.request_id)
            raise

    def discard(self, request_id: str) -> None:
        """Engine thread: stop the request's transfer and spans, if it has them here."""
        self._hook.discard(request_id)
        self._spans.discard(request_id)

    def _abort(self, request_id: str) -> None:
        self.discard(request_id)
        self._rt.engine.abort_request(request_id)

    # -- one request --------------------------------------------------------------------

    def note_abort(self, request_id: str) -> None:
        """An abort for a request with no stream here: remember it for a while, so
        that its prefill, if it comes after all, is refused at once (the router sends
        the decode and prefill calls at once, so an abort may come first)."""
        if self._rt.loop.has_stream(request_id):
            return
        now = time.monotonic()
        for rid, at in list(self._aborted_early.items()):
            if now - at > _ABORTED_MEMORY_S:
                del self._aborted_early[rid]
        self._aborted_early[request_id] = now

    async def prefill(self, request: PrefillRequest) -> PrefillOutcome:
        span = tracing.start("prefill", request.trace, {"transfer": request.transfer_id})
        with request_scope(request.request_id):
            out = await self._prefill(request, span)
        tracing.end(span, "" if out.ok else out.reason)
        return out

    async def _prefill(self, request: PrefillRequest, span: Span) -> PrefillOutcome:
        rid = request.request_id
        if self._aborted_early.pop(rid, None) is not None:
            return PrefillOutcome(ok=False, reason="aborted before it arrived")
        loop = self._rt.loop
        stream = loop.open_stream(rid)
        settled = False
        trace, arrived = tracing.context_of(span), tracing.now_ns()
        try:
            if self._ranks is not None:  # the other ranks first: rank 0 starts the steps
                spec = self._spec(request, trace)
                await self._ranks.acall("role_call", "add_transfer", rid, spec)
            try:
                await loop.call(lambda: self._start(request, trace, arrived), COMMAND_TIMEOUT_S)
            except ValueError as e:
                settled = True
                self._abort_ranks(request, "request rejected")
                return PrefillOutcome(ok=False, reason=f"rejected: {e}")
            deadline = time.monotonic() + request.timeout_s
            final = await self._first_token(stream, deadline)
            with tracing.span("prefill.wait_sent", span):
                sent = await self._sent(request.transfer_id, deadline)
            settled = True
            if isinstance(sent, str):
                self._abort_ranks(request, sent)
                return PrefillOutcome(ok=False, reason=sent)
            self.pushed += 1
            return _outcome(final, sent)
        except BaseException as e:
            tracing.end(span, type(e).__name__)
            raise
        finally:
            loop.close_stream(rid)
            if not settled:  # cancelled, timed out or failed: stop the send, free blocks
                self.sender.abort(request.transfer_id, "prefill abandoned")
                self._abort_ranks(request, "prefill abandoned")
                loop.submit(lambda: self._abort(rid))
            self._release_when_unread(request.transfer_id)

    def _release_when_unread(self, transfer_id: str) -> None:
        """Release the transfer's pins once no rank's sender reads its blocks: at once
        after DONE; after a failure, once the sends in flight are over. In the
        background, so that a failure reaches the caller without waiting for them."""
        task = asyncio.get_running_loop().create_task(self._unpin(transfer_id))
        self._unpinning.add(task)
        task.add_done_callback(self._unpinning.discard)

    async def _unpin(self, transfer_id: str) -> None:
        await release_when_unread(
            transfer_id,
            lambda: self._reading(transfer_id),
            lambda: self._rt.loop.submit(lambda: self._pins.release(transfer_id)),
        )

    async def _reading(self, transfer_id: str) -> bool:
        """Whether any rank's sender may still read the transfer's source blocks."""
        if self.sender.reading(transfer_id):
            return True
        if self._ranks is None:
            return False
        return any(await self._ranks.acall("role_call", "reading", transfer_id))

    async def _first_token(self, stream: OutputStream, deadline: float) -> RequestOutput:
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"prefill of {stream.request_id} timed out")
            outs = await stream.get(remaining)
            if outs[-1].finished:
                return outs[-1]

    def _abort_ranks(self, req: PrefillRequest, reason: str) -> None:
        if self._ranks is not None:
            self._ranks.send("role_call", "abort_send", req.request_id, req.transfer_id, reason)

    async def _status(self, transfer_id: str) -> TransferStatus:
        """The transfer over every rank (the other ranks are asked once rank 0 is done)."""
        status = self.sender.poll(transfer_id)
        if self._ranks is None or status.state is not TransferState.DONE:
            return status
        per_rank = await self._ranks.acall("poll", [transfer_id])
        return combine([status, *(r[0] for r in per_rank)])

    async def _sent(self, transfer_id: str, deadline: float) -> TransferStatus | str:
        """The DONE status once every rank's sender reports it; otherwise why not.
        Rank 0's end wakes this wait; the other ranks are then asked until they agree."""
        async with self._ends.waiting(transfer_id) as ended:
            while True:
                status = await self._status(transfer_id)
                if status.state is TransferState.DONE:
                    return status
                if status.state is TransferState.FAILED:
                    return f"transfer failed: {status.reason}"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self.sender.abort(transfer_id, "send timed out")
                    return "transfer timed out on the sender"
                if ended.ended:  # rank 0 is done; other ranks are behind
                    await asyncio.sleep(_UNREAD_POLL_S)
                else:
                    await ended.wait(min(remaining, _END_WAIT_S))

    def close(self) -> None:
        self.sender.close()
