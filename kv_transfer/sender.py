"""The sender role: one per prefill rank, over any transport's `Connector`.

Lifecycle of one transfer on one sender rank:

    open(spec)                  PENDING; the deadline starts
    send_layer(...) x N         engine thread: queue a job per call, return at once
        pump thread             for each route that wants the layer: Link.send the source
                                region (the link copies it out and checksums what it
                                read) -> TRANSFERRING
    finish(first=...)           engine thread: queue END (with the prompt's first token,
                                on the rank that sampled it), return once the pump has read
                                every source block of the transfer (zero-copy links:
                                once those sends completed); with wait=False at once,
                                and the caller holds the blocks until `reading` is
                                False (at DONE; after a failure, once the sends in
                                flight are over)
        pump thread             send END to every receiver rank the routes reach
    completions resolve         all ok and END sent -> DONE
    error / abort / deadline    FAILED; ABORT goes to the receivers (best effort), and a
                                link with sends stuck past the deadline is torn down

Sending a layer overlaps computing the next one: the engine thread only queues, the
pump copies, and the transport moves bytes on its own threads. When slices of
consecutive layers with the same blocks are already queued (the pump fell behind, or a
whole prompt was computed before its send), a link that takes several layers at once
gets them as one message of up to `max_span_bytes` (by default, the link's own size):
one header and one checksum for the span, and one copy (shm) or one staged send
(torch_dist).
Links are created lazily per receiver rank and reused; a broken link is dropped and the
next transfer that needs the pair connects again. With a `registry`, the pump waits
(bounded by `register_timeout_s` and the deadline) before a transfer's first message to
a receiver rank until that rank registered it (kv_transfer/registration.py), so the
decode side may reserve its blocks while the prompt computes; meanwhile other
transfers' slices wait behind it.

A transfer's record (`Outbound`) and the pump's jobs live in kv_transfer/outbound.py.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from kv_transfer.base import (
    TRANSFERRING,
    FirstToken,
    LocalRank,
    RankId,
    RecordSink,
    SendSpec,
    TransferError,
    TransferRecord,
    TransferState,
    TransferStatus,
    failed,
)
from kv_transfer.header import Header, MessageKind
from kv_transfer.mapping import KVGeometry, plan, routes_by_layer, routes_from
from kv_transfer.outbound import AbortJob, FinishJob, Job, Outbound, SliceJob
from kv_transfer.regions import BlockRegion, LayerSpan, region_of
from kv_transfer.registration import wait_open
from kv_transfer.rendezvous import RendezvousStore
from kv_transfer.transport import Completion, Connector, Link

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SenderConfig:
    checksum: bool | None = None  # per-slice checksum; None: on for CPU caches
    max_inflight_bytes: int = 512 << 20  # staged bytes in flight before the pump waits
    op_timeout_s: float = 10.0  # extra bound on finish() after the deadline
    tick_s: float = 0.05  # deadline check period
    history: int = 4096  # terminal states remembered for poll()
    # One message's bytes when layers are coalesced; None: each link's own size.
    max_span_bytes: int | None = None
    register_timeout_s: float = 10.0  # longest wait for a receiver rank's registration

    def __post_init__(self) -> None:
        span = 1 if self.max_span_bytes is None else self.max_span_bytes
        if min(self.max_inflight_bytes, span) < 1 or min(self.op_timeout_s, self.tick_s) <= 0:
            raise ValueError(f"invalid SenderConfig {self}")


class KVSender:
    """Pushes this prefill rank's KV slices to the decode ranks that own them."""

    def __init__(
        self,
        me: LocalRank,
        cache: KVCache,
        geometry: KVGeometry,
        connector: Connector,
        config: SenderConfig = SenderConfig(),
        registry: RendezvousStore | None = None,
        on_record: RecordSink | None = None,
    ) -> None:
        """`on_record` gets each transfer's figures once it is terminal (under the
        sender's lock: it must not block nor call back into the sender)."""
        self.me, self._geo, self._connector, self._cfg = me, geometry, connector, config
        self._registry, self._on_record = registry, on_record
        self._cache = cache.tensor
        self._on_cuda = self._cache.device.type == "cuda"
        self._block_bytes = self._cache[0, :, 0].numel() * self._cache.element_size()
        self._layers = geometry.layers(me.parallel, me.pp_rank)
        self._heads = geometry.heads(me.parallel, me.tp_rank)
        if (cache.layout.num_layers, cache.layout.num_kv_heads) != (
            len(self._layers),
            len(self._heads),
        ):
            raise ValueError(
                f"cache holds {cache.layout.num_layers} layers x {cache.layout.num_kv_heads} "
                f"heads; rank {me} owns {len(self._layers)} x {len(self._heads)}"
            )
        self._checksum = (
            self._cache.device.type == "cpu" if config.checksum is None else config.checksum
        )
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._active: dict[str, Outbound] = {}
        self._unreleased: set[str] = set()  # transfers whose sources a send may still read
        self._history: OrderedDict[str, TransferStatus] = OrderedDict()
        self._links: dict[RankId, Link] = {}
        self._inflight_bytes = 0
        self._current: Outbound | None = None
        self._closed = False
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._backlog: deque[Job] = deque()  # taken from _jobs, not yet pumped (pump only)
        self._pump_thread = threading.Thread(target=self._pump, name="kv-sender", daemon=True)
        self._pump_thread.start()

    # ---- the role's surface -------------------------------------------------------

    def open(self, spec: SendSpec) -> None:
        routes = routes_from(plan(self._geo, self.me.parallel, spec.dest.parallel), self.me.rank)
        by_layer = routes_by_layer(routes)
        with self._lock:
            if self._closed:
                raise RuntimeError("sender is closed")
            if spec.transfer_id in self._active or spec.transfer_id in self._history:
                raise ValueError(f"transfer {spec.transfer_id!r} already exists")
            self._active[spec.transfer_id] = Outbound(
                spec, by_layer, time.monotonic() + spec.timeout_s
            )
            self._unreleased.add(spec.transfer_id)

    def send_layer(
        self, transfer_id: str, layer: int, block_ids: Sequence[int], first_block: int
    ) -> None:
        if layer not in self._layers:
            raise ValueError(f"layer {layer} is not on rank {self.me} ({self._layers})")
        with self._lock:
            out = self._get(transfer_id)
            if out is None or out.status.terminal or not out.by_layer.get(layer):
                return  # failed already, or nothing of this layer goes anywhere
            if out.finishing:
                raise RuntimeError(f"send_layer after finish for {transfer_id!r}")
            skip = max(0, out.spec.first_block - first_block)
            ids = tuple(block_ids[skip:])
            if not ids:
                return
            out.status = TRANSFERRING
        ready = None
        if self._on_cuda:
            ready = torch.cuda.Event()  # type: ignore[no-untyped-call]
            ready.record()
        self._jobs.put(SliceJob(out, layer, ids, first_block + skip, ready))

    def finish(self, transfer_id: str, wait: bool = True, first: FirstToken | None = None) -> None:
        with self._lock:
            out = self._get(transfer_id)
            if out is None:
                return  # already terminal
            if out.finishing:
                raise RuntimeError(f"finish called twice for {transfer_id!r}")
            out.finishing = True
        self._jobs.put(FinishJob(out, first))
        if not wait:
            return  # the caller holds the blocks until the transfer is terminal
        wait_s = max(0.0, out.deadline - time.monotonic()) + self._cfg.op_timeout_s
        if not out.released.wait(wait_s):
            self._fail(out, f"finish timed out after {wait_s:.1f}s", teardown=True)
            logger.error("transfer %s: source blocks may still be read", transfer_id)

    def poll(self, transfer_id: str) -> TransferStatus:
        self._reap_deadlines()
        with self._lock:
            out = self._get(transfer_id)
            if out is not None:
                return out.status
            return self._history[transfer_id]

    def reading(self, transfer_id: str) -> bool:
        """Whether a send of the transfer may still read its source blocks. False once
        it is over (finished and pumped, or terminal) with no send reading: once DONE,
        as soon as the pump is past its END; after a failure, once the sends in flight
        have completed or failed. Whoever holds the blocks may free them only then."""
        with self._lock:
            return transfer_id in self._unreleased

    @property
    def num_reading(self) -> int:
        """Transfers whose source blocks a send may still read (active ones included)."""
        with self._lock:
            return len(self._unreleased)

    def abort(self, transfer_id: str, reason: str = "aborted") -> None:
        with self._lock:
            out = self._active.get(transfer_id)
        if out is not None:
            self._fail(out, reason)

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._active)

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            outs = list(self._active.values())
        for out in outs:
            self._fail(out, "sender closed", notify=False)
        self._jobs.put(None)
        self._pump_thread.join(timeout=self._cfg.op_timeout_s)
        with self._lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        self._connector.close()

    # ---- state ----------------------------------------------------------------------

    def _get(self, transfer_id: str) -> Outbound | None:
        """The active transfer, None if terminal; KeyError if never opened. Locked."""
        out = self._active.get(transfer_id)
        if out is None and transfer_id not in self._history:
            raise KeyError(f"unknown transfer {transfer_id!r}")
        return out

    def _terminate_locked(self, out: Outbound, status: TransferStatus) -> bool:
        if out.status.terminal:
            return False
        out.status = status = status.ended_now()
        self._maybe_release_locked(out)
        self._active.pop(out.spec.transfer_id, None)
        self._history[out.spec.transfer_id] = status
        while len(self._history) > self._cfg.history:
            self._history.popitem(last=False)
        self._room.notify_all()
        if self._on_record is not None:
            self._report(out, status)
        return True

    def _report(self, out: Outbound, status: TransferStatus) -> None:
        assert self._on_record is not None
        moved = out.first_sent is not None
        record = TransferRecord(
            "send",
            status.state is TransferState.DONE,
            status.reason,
            out.sent_bytes,
            max(0, out.block_end - out.spec.first_block) if moved else 0,
            time.monotonic() - out.first_sent if out.first_sent is not None else 0.0,
        )
        try:
            self._on_record(record)
        except Exception:
            logger.exception("transfer %s: on_record failed", out.spec.transfer_id)

    def _fail(
        self, out: Outbound, reason: str, notify: bool = True, teardown: bool = False
    ) -> None:
        """FAILED; tell the receivers with ABORT (`notify`), or, when sends seem stuck
        (`teardown`), tear down the pairs they are stuck on instead."""
        with self._lock:
            if not self._terminate_locked(out, failed(reason)):
                return
            stuck = list(out.links) if teardown and out.inflight else []
        logger.warning(
            "transfer %s failed on sender %s: %s", out.spec.transfer_id, self.me.id, reason
        )
        for link in stuck:
            self._drop_link(link)
        if notify and not stuck:
            self._jobs.put(AbortJob(out))

    def _maybe_release_locked(self, out: Outbound) -> None:
        """Signal finish() once nothing reads the transfer's source blocks any more."""
        over = out.finish_pumped or out.status.terminal
        if over and out.reading == 0 and self._current is not out:
            out.released.set()
            self._unreleased.discard(out.spec.transfer_id)

    def _maybe_done_locked(self, out: Outbound) -> None:
        if out.ended and out.inflight == 0 and not out.status.terminal:
            self._terminate_locked(out, TransferStatus(TransferState.DONE))

    def _on_sent(self, out: Outbound, link: Link, nbytes: int, done: Completion) -> None:
        with self._lock:
            out.inflight -= 1
            self._inflight_bytes -= nbytes
            if done.error is None:
                out.sent_bytes += nbytes
            if done.holds_source:
                out.reading -= 1
                self._maybe_release_locked(out)
            self._room.notify_all()
            if done.error is None:
                self._maybe_done_locked(out)
        if done.error is not None:
            if link.broken:
                self._drop_link(link)
            self._fail(out, f"send to {link.peer} failed: {done.error}", notify=False)

    def _drop_link(self, link: Link) -> None:
        with self._lock:
            if self._links.get(link.peer) is link:
                del self._links[link.peer]
        link.close()

    def _reap_deadlines(self) -> None:
        now = time.monotonic()
        with self._lock:
            late = [out for out in self._active.values() if now > out.deadline]
        for out in late:
            self._fail(out, f"timed out after {out.spec.timeout_s:g}s", teardown=True)

    # ---- the pump thread ------------------------------------------------------------

    def _pump(self) -> None:
        while True:
            try:
                job = (
                    self._backlog.popleft()
                    if self._backlog
                    else self._jobs.get(timeout=self._cfg.tick_s)
                )
            except queue.Empty:
                self._reap_deadlines()
                continue
            if job is None:
                return
            with self._lock:
                self._current = job.out
            try:
                if isinstance(job, SliceJob):
                    self._send_slices(self._coalesce(job))
                elif isinstance(job, FinishJob):
                    self._send_control(job.out, MessageKind.END, job.first)
                else:
                    self._send_control(job.out, MessageKind.ABORT)
            except TransferError as e:
                self._fail(job.out, str(e), notify=False)
            except Exception as e:  # a bug must not kill the pump
                logger.exception("sender %s: unexpected error", self.me.id)
                self._fail(job.out, f"internal error: {e!r}")
            finally:
                with self._lock:
                    self._current = None
                    if isinstance(job, FinishJob):
                        job.out.finish_pumped = True
                    self._maybe_release_locked(job.out)
            self._reap_deadlines()

    def _await_registered(self, out: Outbound, dst_rank: int) -> None:
        """Return once receiver rank `dst_rank` registered the transfer (at once without
        a registry, or when it did before); raise TransferError if it will not."""
        if self._registry is None or dst_rank in out.registered:
            return
        deadline = min(out.deadline, time.monotonic() + self._cfg.register_timeout_s)
        dest, tid = out.spec.dest.name, out.spec.transfer_id
        error = wait_open(
            self._registry, dest, dst_rank, tid, deadline, lambda: out.status.terminal
        )
        if error is not None:
            raise TransferError(error)
        out.registered.add(dst_rank)

    def _link(self, out: Outbound, dst_rank: int) -> Link:
        peer = RankId(out.spec.dest.name, dst_rank)
        with self._lock:
            link = self._links.get(peer)
        if link is None or link.broken:
            if link is not None:
                self._drop_link(link)
            link = self._connector.connect(self.me, peer)
            with self._lock:
                self._links[peer] = link
        return link

    def _send(
        self,
        out: Outbound,
        link: Link,
        header: Header,
        region: BlockRegion | LayerSpan | None,
        checksum: bool = False,
    ) -> None:
        start = time.monotonic()
        try:
            done = link.send(header, region, checksum)
        except TransferError:
            self._drop_link(link)
            raise
        with self._lock:
            out.inflight += 1
            out.reading += done.holds_source
            out.links.add(link)
            self._inflight_bytes += header.nbytes
            if header.kind is MessageKind.DATA:
                if out.first_sent is None:
                    out.first_sent = start
                out.block_end = max(out.block_end, header.block_start + header.block_count)
        done.add_done_callback(lambda d: self._on_sent(out, link, header.nbytes, d))

    def _wait_for_room(self, out: Outbound) -> None:
        with self._room:
            while (
                self._inflight_bytes > self._cfg.max_inflight_bytes
                and not out.status.terminal
                and time.monotonic() < out.deadline
            ):
                self._room.wait(self._cfg.tick_s)

    def _coalesce(self, first: SliceJob) -> list[SliceJob]:
        """`first` and the queued slices that can share its messages: the next layers
        in order, with the same blocks and routes, up to `max_span_bytes` (by default,
        the smallest span size of the links the routes take)."""
        group = [first]
        if first.ready is not None:  # CUDA sources: every slice waits for its own event
            return group
        if first.out.status.terminal:  # nothing will be sent: don't connect to size spans
            return group
        routes = first.out.by_layer[first.layer]
        span_bytes = self._cfg.max_span_bytes
        if span_bytes is None:
            span_bytes = min(self._link(first.out, r.dst).max_span_bytes for r in routes)
        limit = max(1, span_bytes // (self._block_bytes * len(first.block_ids)))
        while len(group) < limit:
            if not self._backlog:
                try:
                    self._backlog.append(self._jobs.get_nowait())
                except queue.Empty:
                    break
            nxt = self._backlog[0]
            last = group[-1]
            if not (
                isinstance(nxt, SliceJob)
                and nxt.out is first.out
                and nxt.ready is None
                and nxt.layer == last.layer + 1
                and (nxt.block_ids, nxt.first_block) == (first.block_ids, first.first_block)
                and first.out.by_layer[nxt.layer] is routes  # one list per route shape
            ):
                break
            group.append(nxt)
            self._backlog.popleft()
        return group

    def _send_slices(self, group: list[SliceJob]) -> None:
        """One message per route for the whole group where every route's link takes
        spans of its length; else one message per route for each slice in turn."""
        out, first = group[0].out, group[0]
        if out.status.terminal:
            return
        routes = out.by_layer[first.layer]
        if len(group) > 1 and any(self._link(out, r.dst).max_layers < len(group) for r in routes):
            for job in group:
                self._send_slices([job])
            return
        for job in group:
            if job.ready is not None:
                job.ready.synchronize()
        for route in routes:
            source = region_of(
                self._cache,
                range(first.layer - self._layers.start, group[-1].layer + 1 - self._layers.start),
                route.head_start - self._heads.start,
                route.head_stop - self._heads.start,
                first.block_ids,
            )
            header = Header(
                MessageKind.DATA,
                out.spec.transfer_id,
                self.me.rank,
                layer=first.layer,
                head_start=route.head_start,
                head_count=route.num_heads,
                block_start=first.first_block,
                block_count=len(first.block_ids),
                dtype=source.dtype,
                shape=source.shape,
                nbytes=source.nbytes,
                layer_count=len(group),
            )
            self._await_registered(out, route.dst)
            self._wait_for_room(out)
            if out.status.terminal:
                return
            self._send(out, self._link(out, route.dst), header, source, self._checksum)

    def _send_control(
        self, out: Outbound, kind: MessageKind, first: FirstToken | None = None
    ) -> None:
        if kind is MessageKind.END and out.status.terminal:
            return
        dsts = sorted({r.dst for routes in out.by_layer.values() for r in routes})
        for dst in dsts:
            if kind is MessageKind.END:
                self._await_registered(out, dst)
                header = Header(kind, out.spec.transfer_id, self.me.rank, first=first)
                self._send(out, self._link(out, dst), header, None)
                continue
            header = Header(kind, out.spec.transfer_id, self.me.rank)
            try:  # ABORT is best effort: the receiver's deadline is the backstop
                self._link(out, dst).send(header, None)
            except TransferError as e:
                logger.info("ABORT for %s not delivered: %s", out.spec.transfer_id, e)
        if kind is MessageKind.END:
            with self._lock:
                out.ended = True
                self._maybe_done_locked(out)
