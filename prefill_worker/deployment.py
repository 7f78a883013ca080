"""The prefill pool's Ray Serve deployment.

Lifecycle of a replica:

    __init__     build the engine with a kv_transfer `SendHook` on its forward pass and a
                 `KVSender` over the configured transport; start the engine thread
                 (`worker.engine_loop`) and register in the registry. With
                 tp x pp > 1 this replica is rank 0, and every other rank (a Ray actor
                 in the replica's placement group) has its own hook and sender for its
                 own KV slices (`worker.ranks`)
    prefill()    one prompt, sent by the router at the same time as the decode request:
                   register the transfer with every rank's hook, then on rank 0 queue
                   the prompt with
                   max_tokens=1 (one engine command, so no step runs in between); a
                   migrated stream's prompt comes with its tokens so far, which are
                   computed and sent with it, and the token after them is sampled
                   the engine batches it with other prompts under its token budget and
                   chunked prefill; as each layer finishes, the hook queues that
                   layer's newly complete blocks to the sender, which pushes them into
                   the decode replica's blocks while the next layer computes
                   the hook pins every block it queues (`BlockPins`), since the sender
                   may send them straight from the cache after the engine is done with
                   them. Each sender's first message to a decode rank waits (bounded)
                   until that rank registered the transfer (the decode replica
                   reserves its blocks meanwhile; a refusal fails it at once). The
                   chunk that completes the prompt samples the first token; rank 0's
                   hook then finishes the transfer with it, and END carries it (and
                   its logprobs and sampler draws) to the decode replica, which
                   continues from it; the engine frees the request (full prompt
                   blocks stay as prefix cache)
                   wait (bounded) for every rank's sender to report DONE; return
                   success and timings, or why it failed (for the router's metrics)
                 If the caller goes away first, the transfer and the request are
                 aborted and the blocks freed. Either way, the pins are released in the
                 background once no rank's sender reads the blocks any more (at once
                 after DONE; after a failure, once the sends in flight are over, within
                 their transport's operation timeout). The other ranks' hooks
                 pin nothing: rank 0's pins hold the same block ids in every rank's
                 cache.
    abort()      the same abort, by request id. The router sends both calls at once,
                 so an abort may come first: its id is remembered for a while and the
                 prefill, when it comes, is refused at once (rather than waiting for
                 a registration the decode replica, aborted too, never writes)
    __del__      deregister, stop the engine thread, close the sender

Spans (under the router's `prefill.call`): `prefill` for the whole call, the engine's
`prefill.queue`, `prefill.chunk` and `prefill.layer` (`worker.layer_spans`), and
`prefill.wait_sent`, from the first token to every rank's sender reporting DONE.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable

from opentelemetry.trace import Span

from engine import RequestOutput
from engine.block_pins import BlockPins
from kv_transfer.base import InstanceRef, SendSpec, TransferState, TransferStatus
from kv_transfer.engine_hook import SendHook
from kv_transfer.sender import KVSender
from registry import Role
from telemetry import TraceContext, request_scope, tracing
from worker.engine_loop import OutputStream
from worker.kv_roles import local_rank, sender_connector, transfer_host
from worker.layer_spans import LayerSpans
from worker.messages import (
    PrefillOutcome,
    PrefillRequest,
    WorkerSettings,
    WorkerState,
)
from worker.ranks import RemoteRanks, combine
from worker.runtime import WorkerRuntime, replica_unique_id

logger = logging.getLogger(__name__)

_ABORTED_MEMORY_S = 120.0  # how long an abort that came before its prefill is kept

_COMMAND_TIMEOUT_S = 30.0
_SEND_POLL_S = 0.001
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


class PrefillWorker:
    def __init__(self, settings: WorkerSettings) -> None:
        if settings.role is not Role.PREFILL:
            raise ValueError("PrefillWorker serves prefill pools")
        self._hook = SendHook(settings.engine.block_size, first_token=True)
        self._spans = LayerSpans(self._hook)
        self._rt = WorkerRuntime(
            settings,
            replica_unique_id(),
            layer_hook=self._spans,
            output_hook=self._hook.on_outputs,
            tick=self._spans.mark_step,
        )
        rendezvous = self._rt.rendezvous()
        connector = sender_connector(settings, rendezvous, transfer_host(settings.transfer_host))
        self._sender = KVSender(
            local_rank(settings, self._rt.instance_id, 0),
            self._rt.engine.kv_cache,
            self._rt.geometry,
            connector,
            registry=rendezvous,
            on_record=self._rt.transfer_metrics.record,
        )
        self._pins = BlockPins(self._rt.engine.block_pool)
        self._hook.bind(self._sender, self._pins)
        self._ranks: RemoteRanks | None = self._rt.ranks
        self._unpinning: set[asyncio.Task[None]] = set()
        self._aborted_early: dict[str, float] = {}  # request id -> time.monotonic()
        self._rt.start()

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

    def _abort(self, request_id: str) -> None:
        self._hook.discard(request_id)
        self._spans.discard(request_id)
        self._rt.engine.abort_request(request_id)

    # -- the deployment's methods -----------------------------------------------------------

    async def prefill(self, request: PrefillRequest, replica: str | None = None) -> PrefillOutcome:
        self._rt.check_pin(replica)
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
                await self._ranks.acall("add_transfer", rid, self._spec(request, trace))
            try:
                await loop.call(lambda: self._start(request, trace, arrived), _COMMAND_TIMEOUT_S)
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
            return _outcome(final, sent)
        except BaseException as e:
            tracing.end(span, type(e).__name__)
            raise
        finally:
            loop.close_stream(rid)
            if not settled:  # cancelled, timed out or failed: stop the send, free blocks
                self._sender.abort(request.transfer_id, "prefill abandoned")
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
        if self._sender.reading(transfer_id):
            return True
        if self._ranks is None:
            return False
        return any(await self._ranks.acall("reading", transfer_id))

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
            self._ranks.send("abort_send", req.request_id, req.transfer_id, reason)

    async def _status(self, transfer_id: str) -> TransferStatus:
        """The transfer over every rank (the other ranks are asked once rank 0 is done)."""
        status = self._sender.poll(transfer_id)
        if self._ranks is None or status.state is not TransferState.DONE:
            return status
        per_rank = await self._ranks.acall("poll", [transfer_id])
        return combine([status, *(r[0] for r in per_rank)])

    async def _sent(self, transfer_id: str, deadline: float) -> TransferStatus | str:
        """The DONE status once every rank's sender reports it; otherwise why not."""
        while True:
            status = await self._status(transfer_id)
            if status.state is TransferState.DONE:
                return status
            if status.state is TransferState.FAILED:
                return f"transfer failed: {status.reason}"
            if time.monotonic() > deadline:
                self._sender.abort(transfer_id, "send timed out")
                return "transfer timed out on the sender"
            await asyncio.sleep(_SEND_POLL_S)

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        if not self._rt.loop.has_stream(request_id):
            now = time.monotonic()
            for rid, at in list(self._aborted_early.items()):
                if now - at > _ABORTED_MEMORY_S:
                    del self._aborted_early[rid]
            self._aborted_early[request_id] = now
        await self._rt.loop.call(lambda: self._abort(request_id), _COMMAND_TIMEOUT_S)

    async def state(self, replica: str | None = None) -> WorkerState:
        self._rt.check_pin(replica)
        state = await self._rt.loop.call(self._state, _COMMAND_TIMEOUT_S)
        if self._ranks is None:
            return state
        others = sum(await self._ranks.acall("num_active"))
        return dataclasses.replace(state, active_transfers=state.active_transfers + others)

    def _state(self) -> WorkerState:
        engine = self._rt.engine
        return WorkerState(
            instance_id=self._rt.instance_id,
            pool=self._rt.settings.pool,
            role=self._rt.settings.role,
            num_requests=engine.num_requests,
            num_streams=self._rt.loop.num_streams,
            free_blocks=engine.block_pool.num_free,
            total_blocks=engine.block_pool.num_blocks,
            active_transfers=self._sender.num_active,
            pending_remote_prefills=self._hook.num_requests,
            remote_prefill_fallbacks=0,
            transfer_failures=0,
            heartbeat_running=self._rt.presence.heartbeat_running,
        )

    async def suspend_heartbeat(self, replica: str | None = None) -> None:
        """Stop renewing the lease without deregistering (for fault drills)."""
        self._rt.check_pin(replica)
        self._rt.presence.suspend()

    async def resume_heartbeat(self, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        self._rt.presence.resume()

    def check_health(self) -> None:
        self._rt.loop.check()

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        rt.stop()
        self._sender.close()
