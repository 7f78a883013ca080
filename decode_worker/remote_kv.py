"""The receive side of remote prefill on a decode replica: the one owner of the wait for
remote KV, over this rank's `KVReceiver` and, with TP/PP, every other rank's.

Lifecycle of one remote prefill (the router sent the prefill at the same time):

    start(request)        engine thread: the engine's scheduler holds blocks for the
                          prompt (WAITING_FOR_REMOTE_KV) and every rank's receiver
                          expects the transfer, which registers it for the prefill's
                          senders. Without free blocks or a transfer slot it returns the
                          reason, refuses the transfer (its senders fail at once) and
                          the caller prefills the prompt here
    the transfer ends     this rank's receiver calls `ended` from its own thread (the
                          last slice and the END with the first token landed, or it
                          failed or timed out); with TP/PP the other ranks' receivers
                          report theirs to a thread here as they end
                          (`RemoteRanks.watch_ended`, one long-poll per rank).
                          Each queues a command on the engine thread, which settles
                          the request once every rank is terminal:
                            all DONE  -> the sequence joins the running batch with the
                                         first token (and sampler draws) from the header
                            a FAILED  -> the transfer is aborted on every rank, then the
                                         prompt is recomputed here (a counted fallback)
    prefill_failed(id)    engine thread: the router saw the prefill fail; as on FAILED, at
                          once rather than at the transfer's timeout (a no-op once it
                          settled). One that comes before `start` is remembered, bounded
                          in time and number, and `start` refuses the transfer
    abort(request_id)     engine thread: the transfer on every rank first (no write can
                          land after it returns), then the engine request, whose blocks
                          return to the pool

Spans (under the decode call's span): `decode.wait_kv`, from holding the blocks to the
transfer settling (an error when it fell back), and `decode.join`, the sequence joining
the running batch with the first token.

Nothing here polls on the engine thread. `info(request_id)` tells the stream what
happened: disaggregated or fallen back (and why), and the time from the first token's
sampling to its landing here.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from engine import LLMEngine, RequestOutput, TokenLogprob
from engine.block_pool import OutOfBlocksError
from kv_transfer.base import (
    FirstToken,
    InstanceRef,
    RecvSpec,
    TransferState,
    TransferStatus,
    failed,
)
from kv_transfer.receiver import KVReceiver
from telemetry import TraceContext, tracing
from worker.messages import FallbackReason, WorkerRequest
from worker.ranks import RemoteRanks, combine

logger = logging.getLogger(__name__)

_FAILED_EARLY_S = 60.0  # how long a prefill failure that came before its request is kept
_FAILED_EARLY_MAX = 1024  # and how many at most (the oldest go first)

Submit = Callable[[Callable[[], None]], Future[None]]
Recomputed = Callable[[int, str], None]  # (prompt blocks, FallbackReason value)


@dataclass
class _Pending:
    request_id: str
    local: TransferStatus | None = None  # this rank's terminal status, once known
    others: TransferStatus | None = None  # the other ranks', once all are terminal
    done_wall: float = 0.0  # time.time() when this rank's receiver ended
    trace: TraceContext | None = None  # the decode call's span
    start_ns: int = 0  # when the blocks were held
    num_blocks: int = 0  # the prompt's blocks the transfer fills


@dataclass(frozen=True)
class RemoteInfo:
    disaggregated: bool
    kv_transfer_s: float = 0.0
    fallback_reason: str = ""
    fallback: FallbackReason | None = None


class RemoteKV:
    def __init__(
        self,
        engine: LLMEngine,
        submit: Submit,
        post: Callable[[RequestOutput], None],
        ranks: RemoteRanks | None = None,
        recomputed: Recomputed | None = None,
    ) -> None:
        """Build the owner, then its receiver with `on_end=owner.ended`, then `bind` it.
        `recomputed(blocks, reason)` counts each fallback's prompt blocks."""
        self._engine, self._submit, self._post, self._ranks = engine, submit, post, ranks
        self._recomputed = recomputed
        self._receiver: KVReceiver | None = None
        self._pending: dict[str, _Pending] = {}  # by transfer id (engine thread)
        self._by_request: dict[str, str] = {}  # request id -> transfer id (engine thread)
        self._lock = threading.Lock()  # guards _info (streams read it) and _in_flight
        self._info: dict[str, RemoteInfo] = {}
        # prefill failures told before their request came: request id -> (monotonic, why)
        self._failed_early: dict[str, tuple[float, str]] = {}
        self._in_flight: set[str] = set()  # transfers still running on the other ranks
        # what each other rank reported of a transfer in flight, by rank (under _lock)
        self._reported: dict[str, dict[int, TransferStatus]] = {}
        self.transfer_failures = 0
        self.landed = 0  # remote prefills whose KV and first token landed here
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        if ranks is not None:
            self._watcher = threading.Thread(
                target=ranks.watch_ended,
                args=(self._stop, self._ranks_ended, self._rank_lost),
                name="rank-endings",
                daemon=True,
            )
            self._watcher.start()

    def bind(self, receiver: KVReceiver) -> None:
        self._receiver = receiver

    @property
    def receiver(self) -> KVReceiver:
        if self._receiver is None:
            raise RuntimeError("RemoteKV has no receiver; call bind() first")
        return self._receiver

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    @property
    def num_active(self) -> int:
        """Transfers holding receiver resources on any rank (for leak checks)."""
        with self._lock:
            return self.receiver.num_active + len(self._in_flight)

    def info(self, request_id: str) -> RemoteInfo | None:
        with self._lock:
            return self._info.get(request_id)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._info.pop(request_id, None)

    def _set_info(self, request_id: str, info: RemoteInfo) -> None:
        with self._lock:
            self._info[request_id] = info

    # -- engine thread ----------------------------------------------------------------

    def start(self, req: WorkerRequest, trace: TraceContext | None = None) -> str:
        """Hold blocks and expect the transfer; "" or why not (then nothing is held).
        `trace`: the span that this request's wait and join spans go under."""
        plan = req.remote
        assert plan is not None
        rid, tid = req.request_id, plan.transfer_id
        early = self._failed_early.pop(rid, None)
        if early is not None:  # its prefill failed already: the KV will never come
            return self._refuse(req, f"prefill failed: {early[1]}", FallbackReason.PREFILL_FAILED)
        try:
            blocks = self._engine.reserve_remote_prefill(
                rid, list(req.prompt_token_ids), req.params, resume=req.resume
            )
        except OutOfBlocksError as e:
            return self._refuse(req, f"decode_full (no free KV blocks: {e})")
        source = InstanceRef(plan.source_instance, plan.source_parallel)
        spec = RecvSpec(tid, tuple(blocks), source, 0, plan.timeout_s)
        self._pending[tid] = _Pending(
            rid, num_blocks=len(blocks), trace=trace, start_ns=tracing.now_ns()
        )
        self._by_request[rid] = tid
        try:
            self._expect(spec)
        except (RuntimeError, ValueError) as e:  # no transfer slot, or a bad spec
            self._drop(tid)
            self._engine.abort_request(rid)
            return self._refuse(req, f"decode_full (cannot expect the transfer: {e})")
        self._set_info(rid, RemoteInfo(disaggregated=True))
        return ""

    def _expect(self, spec: RecvSpec) -> None:
        """Every rank expects it; only this one (which drives the engine) asks for the
        first token. Undone on every rank if one cannot."""
        if self._ranks is not None:
            with self._lock:  # before any rank can report it ended
                self._in_flight.add(spec.transfer_id)
            try:
                self._ranks.call("role_call", "expect", spec)
            except Exception as e:
                with self._lock:
                    self._forget_locked(spec.transfer_id)
                self._ranks.send(
                    "role_call", "abort_recv", spec.transfer_id, "another rank cannot expect it"
                )
                raise RuntimeError(f"the other ranks cannot expect the transfer: {e}") from e
        else:
            self._pending[spec.transfer_id].others = TransferStatus(TransferState.DONE)
        try:
            self.receiver.expect(dataclasses.replace(spec, first_token=True))
        except BaseException:
            self._abort_others(spec.transfer_id, "this rank cannot expect it")
            raise

    def _count_recompute(self, prompt_tokens: int, reason: FallbackReason) -> None:
        if self._recomputed is not None:
            size = self._engine.config.block_size
            self._recomputed(-(-prompt_tokens // size), reason.value)

    def _refuse(
        self, req: WorkerRequest, reason: str, kind: FallbackReason = FallbackReason.DECODE_FULL
    ) -> str:
        """Count the prompt's recompute, and refuse its transfer (its senders fail)."""
        assert req.remote is not None
        request_id, transfer_id = req.request_id, req.remote.transfer_id
        self._count_recompute(len(req.prompt_token_ids), kind)
        self._set_info(request_id, RemoteInfo(False, 0.0, reason, kind))
        self.receiver.refuse(transfer_id, reason)
        if self._ranks is not None:
            self._ranks.send("role_call", "refuse", transfer_id, reason)
        return reason

    def prefill_failed(self, request_id: str, reason: str) -> None:
        """The request's remote prefill failed (the router saw it): fall back now."""
        tid = self._by_request.get(request_id)
        if tid is not None:
            why = f"prefill failed: {reason}"
            self._fall_back(tid, self._pending[tid], why, FallbackReason.PREFILL_FAILED)
        elif self.info(request_id) is None:  # not started yet (or its stream is over)
            now = time.monotonic()
            early = self._failed_early
            for rid, (at, _) in list(early.items()):
                if now - at > _FAILED_EARLY_S or len(early) >= _FAILED_EARLY_MAX:
                    del early[rid]
            early[request_id] = (now, reason)

    @property
    def num_failed_early(self) -> int:
        """Prefill failures remembered for requests not started (engine thread)."""
        return len(self._failed_early)

    def abort(self, request_id: str) -> None:
        self._failed_early.pop(request_id, None)
        tid = self._by_request.get(request_id)
        if tid is not None:
            self._drop(tid)
            self.receiver.abort(tid, "request aborted")
            self._abort_others(tid, "request aborted")
        self._engine.abort_request(request_id)

    def close(self) -> None:
        """Abort everything still pending (replica shutdown)."""
        for rid in list(self._by_request):
            self.abort(rid)
        self._stop.set()
        if self._watcher is not None:
            self._watcher.join(5.0)

    def _drop(self, transfer_id: str) -> _Pending | None:
        p = self._pending.pop(transfer_id, None)
        if p is not None:
            self._by_request.pop(p.request_id, None)
        return p

    def _abort_others(self, transfer_id: str, reason: str) -> None:
        if self._ranks is None:
            return
        with self._lock:
            self._forget_locked(transfer_id)
        try:
            self._ranks.call("role_call", "abort_recv", transfer_id, reason)
        except Exception:
            logger.exception("aborting %s on the other ranks", transfer_id)

    # -- completions ------------------------------------------------------------------

    def ended(self, transfer_id: str, status: TransferStatus) -> None:
        """This rank's receiver ended the transfer (any thread; never blocks)."""
        wall = time.time()
        self._submit(lambda: self._local_ended(transfer_id, status, wall))

    def _local_ended(self, transfer_id: str, status: TransferStatus, wall: float) -> None:
        p = self._pending.get(transfer_id)
        if p is not None:
            p.local, p.done_wall = status, wall
            self._settle(transfer_id, p)

    def _others_ended(self, transfer_id: str, status: TransferStatus) -> None:
        p = self._pending.get(transfer_id)
        if p is not None:
            p.others = status
            self._settle(transfer_id, p)

    def _settle(self, transfer_id: str, p: _Pending) -> None:
        """Commit once every rank is DONE; fall back as soon as one FAILED."""
        statuses = [s for s in (p.local, p.others) if s is not None]
        status = combine(statuses) if statuses else None
        if status is not None and status.state is TransferState.FAILED:
            self._fall_back(transfer_id, p, f"transfer failed: {status.reason}")
        elif p.local is not None and p.others is not None:
            first = p.local.first
            if first is None:  # a receiver asked for it is DONE only with it
                self._fall_back(transfer_id, p, "transfer failed: no first token")
            else:
                self._commit(transfer_id, p, first)

    def _commit(self, transfer_id: str, p: _Pending, first: FirstToken) -> None:
        self._drop(transfer_id)
        self.landed += 1
        joined_ns = tracing.now_ns()
        tracing.record("decode.wait_kv", p.trace, p.start_ns, joined_ns)
        kv_s = max(0.0, p.done_wall - first.sampled_wall)
        self._set_info(p.request_id, RemoteInfo(True, kv_s, ""))
        lp = (
            TokenLogprob(first.token_id, first.logprob, first.top)
            if first.logprob is not None
            else None
        )
        try:
            out = self._engine.commit_remote_prefill(p.request_id, first.token_id, lp, first.draws)
        except ValueError as e:  # a first token this engine cannot take
            self._recompute(p, f"transfer failed: {e}")
            return
        tracing.record("decode.join", p.trace, joined_ns, tracing.now_ns())
        self._post(out)

    def _fall_back(
        self,
        transfer_id: str,
        p: _Pending,
        reason: str,
        kind: FallbackReason = FallbackReason.TRANSFER_FAILED,
    ) -> None:
        self._drop(transfer_id)
        if p.trace is not None:
            tracing.end(tracing.start("decode.wait_kv", p.trace, None, p.start_ns), reason)
        if kind is FallbackReason.TRANSFER_FAILED:
            self.transfer_failures += 1
        if p.local is None or p.local.state is not TransferState.FAILED:
            self.receiver.abort(transfer_id, reason)
        if p.others is None:
            self._abort_others(transfer_id, reason)
        self._recompute(p, reason, kind)

    def _recompute(
        self, p: _Pending, reason: str, kind: FallbackReason = FallbackReason.TRANSFER_FAILED
    ) -> None:
        logger.warning("request %s: %s; prefilling locally", p.request_id, reason)
        if self._recomputed is not None and p.num_blocks:
            self._recomputed(p.num_blocks, kind.value)
        info = RemoteInfo(False, 0.0, reason, kind)
        self._set_info(p.request_id, info)
        self._engine.fail_remote_prefill(p.request_id)

    # -- the other ranks (TP/PP) --------------------------------------------------------

    def _ranks_ended(self, rank: int, ended: dict[str, TransferStatus]) -> None:
        """Rank `rank` ended these transfers (the watcher's thread). A transfer in
        flight is settled for the other ranks once one failed or all ended it."""
        settled = []
        num_others = len(self._ranks.actors) if self._ranks is not None else 0
        with self._lock:
            for tid, status in ended.items():
                if tid not in self._in_flight:
                    continue  # aborted, or settled already
                seen = self._reported.setdefault(tid, {})
                seen[rank] = status
                if status.state is TransferState.FAILED or len(seen) == num_others:
                    settled.append((tid, combine(list(seen.values()))))
        for tid, status in settled:
            self._other_ranks_ended(tid, status)

    def _rank_lost(self, rank: int, error: Exception) -> None:
        """Rank `rank` cannot report: every transfer in flight fails."""
        logger.warning("rank %d cannot report its transfers: %s", rank, error)
        with self._lock:
            ids = list(self._in_flight)
        for tid in ids:
            self._other_ranks_ended(tid, failed(f"another rank is unreachable: {error}"))

    def _forget_locked(self, transfer_id: str) -> None:
        self._in_flight.discard(transfer_id)
        self._reported.pop(transfer_id, None)

    def _other_ranks_ended(self, transfer_id: str, status: TransferStatus) -> None:
        with self._lock:
            if transfer_id not in self._in_flight:
                return
            self._forget_locked(transfer_id)
        self._submit(lambda: self._others_ended(transfer_id, status))
