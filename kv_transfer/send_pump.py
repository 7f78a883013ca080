"""A sender rank's pump: the thread that turns queued jobs into messages on links.

    job taken           a SliceJob, with the slices queued behind it that can share its
                        messages (coalesced into a span), a FinishJob or an AbortJob
    per receiver rank   wait (bounded) until it registered the transfer, when there is
                        a registry; wait for room under `max_inflight_bytes`
    Link.send           the link copies (and checksums) the source region, or sends it
                        from the cache; its `Completion` resolves on a transport thread
    completion          bytes in flight drop; DONE once END went out and all completed
    failure             FAILED in the records; ABORT queued for the receivers (best
                        effort), or the links of stuck sends torn down instead

Links are created lazily per receiver rank and reused; a broken one is dropped and the
next message to that rank connects again. The pump checks deadlines every `tick_s`.
A traced transfer's messages and layer sends are spans (kv_transfer/send_spans.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque

import torch

from kv_transfer.base import FirstToken, LocalRank, RankId, TransferError, failed
from kv_transfer.header import Header, MessageKind
from kv_transfer.outbound import AbortJob, FinishJob, Job, Outbound, Outbounds, SliceJob
from kv_transfer.regions import BlockRegion, LayerSpan, region_of
from kv_transfer.registration import wait_open
from kv_transfer.rendezvous import RendezvousStore
from kv_transfer.send_spans import MessageSpan, message_span
from kv_transfer.transport import Completion, Connector, Link
from telemetry import request_scope

logger = logging.getLogger(__name__)


class SendPump:
    """Sends the jobs of one sender rank's transfers over its links, in order."""

    def __init__(
        self,
        me: LocalRank,
        cache: torch.Tensor,
        local: tuple[range, range],  # (layers, kv heads) of this rank
        connector: Connector,
        book: Outbounds,
        *,
        checksum: bool,
        tick_s: float,
        max_inflight_bytes: int,
        max_span_bytes: int | None,
        registry: RendezvousStore | None,
        register_timeout_s: float,
    ) -> None:
        self.me, self._cache, self._connector, self._book = me, cache, connector, book
        self._layers, self._heads = local
        self._block_bytes = cache[0, :, 0].numel() * cache.element_size()
        self._checksum, self._tick_s = checksum, tick_s
        self._max_inflight, self._max_span = max_inflight_bytes, max_span_bytes
        self._registry, self._register_timeout_s = registry, register_timeout_s
        self._links: dict[RankId, Link] = {}  # under book.lock
        self._jobs: queue.SimpleQueue[Job] = queue.SimpleQueue()
        self._backlog: deque[Job] = deque()  # taken from _jobs, not yet pumped (pump only)
        self._thread = threading.Thread(target=self._run, name="kv-sender", daemon=True)
        self._thread.start()

    def put(self, job: Job) -> None:
        self._jobs.put(job)

    def fail(self, out: Outbound, reason: str, notify: bool = True, teardown: bool = False) -> None:
        """FAILED; tell the receivers with ABORT (`notify`), or, when sends seem stuck
        (`teardown`), tear down the pairs they are stuck on instead."""
        with self._book.lock:
            if not self._book.terminate_locked(out, failed(reason)):
                return
            stuck = list(out.links) if teardown and out.inflight else []
        with request_scope(out.request_id):
            logger.warning(
                "transfer %s failed on sender %s: %s", out.spec.transfer_id, self.me.id, reason
            )
        for link in stuck:
            self._drop_link(link)
        if notify and not stuck:
            self._jobs.put(AbortJob(out))

    def reap_deadlines(self) -> None:
        for out in self._book.late(time.monotonic()):
            self.fail(out, f"timed out after {out.spec.timeout_s:g}s", teardown=True)

    def close(self, timeout_s: float) -> None:
        """Stop the thread (bounded), then close every link and the connector."""
        self._jobs.put(None)
        self._thread.join(timeout=timeout_s)
        with self._book.lock:
            links, self._links = list(self._links.values()), {}
        for link in links:
            link.close()
        self._connector.close()

    # ---- the thread -----------------------------------------------------------------

    def _next(self) -> Job:
        while True:
            if self._backlog:
                return self._backlog.popleft()
            try:
                return self._jobs.get(timeout=self._tick_s)
            except queue.Empty:
                self.reap_deadlines()

    def _run(self) -> None:
        while (job := self._next()) is not None:
            with self._book.lock:
                self._book.current = job.out
            try:
                if isinstance(job, SliceJob):
                    self._send_slices(self._coalesce(job))
                elif isinstance(job, FinishJob):
                    self._send_control(job.out, MessageKind.END, job.first)
                else:
                    self._send_control(job.out, MessageKind.ABORT)
            except TransferError as e:
                self.fail(job.out, str(e), notify=False)
            except Exception as e:  # a bug must not kill the pump
                logger.exception("sender %s: unexpected error", self.me.id)
                self.fail(job.out, f"internal error: {e!r}")
            finally:
                with self._book.lock:
                    self._book.current = None
                    if isinstance(job, FinishJob):
                        job.out.finish_pumped = True
                    self._book.maybe_release_locked(job.out)
            self.reap_deadlines()

    # ---- links and sends ------------------------------------------------------------

    def _link(self, out: Outbound, dst_rank: int) -> Link:
        peer = RankId(out.spec.dest.name, dst_rank)
        with self._book.lock:
            link = self._links.get(peer)
        if link is None or link.broken:
            if link is not None:
                self._drop_link(link)
            link = self._connector.connect(self.me, peer)
            with self._book.lock:
                self._links[peer] = link
        return link

    def _drop_link(self, link: Link) -> None:
        with self._book.lock:
            if self._links.get(link.peer) is link:
                del self._links[link.peer]
        link.close()

    def _await_registered(self, out: Outbound, dst_rank: int) -> None:
        """Return once receiver rank `dst_rank` registered the transfer (at once without
        a registry, or when it did before); raise TransferError if it will not."""
        if self._registry is None or dst_rank in out.registered:
            return
        deadline = min(out.deadline, time.monotonic() + self._register_timeout_s)
        dest, tid = out.spec.dest.name, out.spec.transfer_id
        error = wait_open(
            self._registry, dest, dst_rank, tid, deadline, lambda: out.status.terminal
        )
        if error is not None:
            raise TransferError(error)
        out.registered.add(dst_rank)

    def _send(
        self,
        out: Outbound,
        link: Link,
        header: Header,
        region: BlockRegion | LayerSpan | None,
        checksum: bool = False,
        span: MessageSpan | None = None,
    ) -> None:
        if span is not None:
            header = header.traced(span.context)
        start = time.monotonic()
        try:
            done = link.send(header, region, checksum)
        except TransferError as e:
            self._drop_link(link)
            if span is not None:
                span.ended(str(e))
            raise
        with self._book.lock:
            out.inflight += 1
            out.reading += done.holds_source
            out.links.add(link)
            self._book.inflight_bytes += header.nbytes
            if header.kind is MessageKind.DATA:  # for the transfer's record
                if out.first_sent is None:
                    out.first_sent = start
                out.block_end = max(out.block_end, header.block_start + header.block_count)
        done.add_done_callback(lambda d: self._on_sent(out, link, header.nbytes, d, span))

    def _on_sent(
        self, out: Outbound, link: Link, nbytes: int, done: Completion, span: MessageSpan | None
    ) -> None:
        if span is not None:
            span.ended("" if done.error is None else str(done.error))
        book = self._book
        with book.lock:
            out.inflight -= 1
            book.inflight_bytes -= nbytes
            if done.error is None:
                out.sent_bytes += nbytes
            if done.holds_source:
                out.reading -= 1
                book.maybe_release_locked(out)
            book.room.notify_all()
            if done.error is None:
                book.maybe_done_locked(out)
        if done.error is not None:
            if link.broken:
                self._drop_link(link)
            self.fail(out, f"send to {link.peer} failed: {done.error}", notify=False)

    def _wait_for_room(self, out: Outbound) -> None:
        book = self._book
        with book.room:
            while (
                book.inflight_bytes > self._max_inflight
                and not out.status.terminal
                and time.monotonic() < out.deadline
            ):
                book.room.wait(self._tick_s)

    # ---- messages -------------------------------------------------------------------

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
        span_bytes = self._max_span
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
            if not (
                isinstance(nxt, SliceJob)
                and nxt.out is first.out
                and nxt.ready is None
                and nxt.layer == group[-1].layer + 1
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
        local = range(first.layer - self._layers.start, group[-1].layer + 1 - self._layers.start)
        for route in routes:
            source = region_of(
                self._cache,
                local,
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
            layers = [(job.layer, job.queued_ns) for job in group]
            span = message_span(out.spec.trace, "DATA", route.dst, source.nbytes, layers)
            link = self._link(out, route.dst)
            self._send(out, link, header, source, self._checksum, span)

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
                span = message_span(out.spec.trace, "END", dst, 0)
                self._send(out, self._link(out, dst), header, None, span=span)
                continue
            header = Header(kind, out.spec.transfer_id, self.me.rank)
            try:  # ABORT is best effort: the receiver's deadline is the backstop
                self._link(out, dst).send(header, None)
            except TransferError as e:
                logger.info("ABORT for %s not delivered: %s", out.spec.transfer_id, e)
        if kind is MessageKind.END:
            with self._book.lock:
                out.ended = True
                self._book.maybe_done_locked(out)
