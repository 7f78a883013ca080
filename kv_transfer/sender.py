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
pump (kv_transfer/send_pump.py) copies, and the transport moves bytes on its own
threads. When slices of consecutive layers with the same blocks are already queued
(the pump fell behind, or a whole prompt was computed before its send), a link that
takes several layers at once gets them as one message of up to `max_span_bytes` (by
default, the link's own size): one header and one checksum for the span, and one copy
(shm) or one staged send (torch_dist).
Links are created lazily per receiver rank and reused; a broken link is dropped and the
next transfer that needs the pair connects again. With a `registry`, the pump waits
(bounded by `register_timeout_s` and the deadline) before a transfer's first message to
a receiver rank until that rank registered it (kv_transfer/registration.py), so the
decode side may reserve its blocks while the prompt computes; meanwhile other
transfers' slices wait behind it.

A transfer's record (`Outbound`), the records' lock (`Outbounds`) and the pump's jobs
live in kv_transfer/outbound.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from kv_transfer.base import (
    TRANSFERRING,
    EndSink,
    FirstToken,
    LocalRank,
    RecordSink,
    SendSpec,
    TransferStatus,
)
from kv_transfer.mapping import KVGeometry, plan, routes_by_layer, routes_from
from kv_transfer.outbound import FinishJob, Outbound, Outbounds, SliceJob
from kv_transfer.rendezvous import RendezvousStore
from kv_transfer.send_pump import SendPump
from kv_transfer.send_spans import queued_at
from kv_transfer.transport import Connector
from telemetry.context import REQUEST_ID

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
        on_end: EndSink | None = None,
    ) -> None:
        """`on_record` gets each transfer's figures once it is terminal, and `on_end`
        its id and terminal status (under the records' lock: they must not block nor
        call back into the sender)."""
        self.me, self._geo, self._cfg = me, geometry, config
        tensor = cache.tensor
        self._on_cuda = tensor.device.type == "cuda"
        self._layers = geometry.layers(me.parallel, me.pp_rank)
        heads = geometry.heads(me.parallel, me.tp_rank)
        if (cache.layout.num_layers, cache.layout.num_kv_heads) != (len(self._layers), len(heads)):
            raise ValueError(
                f"cache holds {cache.layout.num_layers} layers x {cache.layout.num_kv_heads} "
                f"heads; rank {me} owns {len(self._layers)} x {len(heads)}"
            )
        self._book = Outbounds(config.history, on_record, on_end)
        self._pump = SendPump(
            me,
            tensor,
            (self._layers, heads),
            connector,
            self._book,
            checksum=tensor.device.type == "cpu" if config.checksum is None else config.checksum,
            tick_s=config.tick_s,
            max_inflight_bytes=config.max_inflight_bytes,
            max_span_bytes=config.max_span_bytes,
            registry=registry,
            register_timeout_s=config.register_timeout_s,
        )

    def open(self, spec: SendSpec) -> None:
        routes = routes_from(plan(self._geo, self.me.parallel, spec.dest.parallel), self.me.rank)
        by_layer = routes_by_layer(routes)
        book = self._book
        with book.lock:
            if book.closed:
                raise RuntimeError("sender is closed")
            if spec.transfer_id in book.active or spec.transfer_id in book.history:
                raise ValueError(f"transfer {spec.transfer_id!r} already exists")
            book.active[spec.transfer_id] = Outbound(
                spec, by_layer, time.monotonic() + spec.timeout_s, request_id=REQUEST_ID.get()
            )
            book.unreleased.add(spec.transfer_id)

    def send_layer(
        self, transfer_id: str, layer: int, block_ids: Sequence[int], first_block: int
    ) -> None:
        if layer not in self._layers:
            raise ValueError(f"layer {layer} is not on rank {self.me} ({self._layers})")
        with self._book.lock:
            out = self._book.get_locked(transfer_id)
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
        queued = queued_at(out.spec.trace)
        self._pump.put(SliceJob(out, layer, ids, first_block + skip, ready, queued))

    def finish(self, transfer_id: str, wait: bool = True, first: FirstToken | None = None) -> None:
        with self._book.lock:
            out = self._book.get_locked(transfer_id)
            if out is None:
                return  # already terminal
            if out.finishing:
                raise RuntimeError(f"finish called twice for {transfer_id!r}")
            out.finishing = True
        self._pump.put(FinishJob(out, first))
        if not wait:
            return  # the caller holds the blocks until the transfer is terminal
        wait_s = max(0.0, out.deadline - time.monotonic()) + self._cfg.op_timeout_s
        if not out.released.wait(wait_s):
            self._pump.fail(out, f"finish timed out after {wait_s:.1f}s", teardown=True)
            logger.error("transfer %s: source blocks may still be read", transfer_id)

    def poll(self, transfer_id: str) -> TransferStatus:
        self._pump.reap_deadlines()
        with self._book.lock:
            out = self._book.get_locked(transfer_id)
            if out is not None:
                return out.status
            return self._book.history[transfer_id]

    def reading(self, transfer_id: str) -> bool:
        """Whether a send of the transfer may still read its source blocks. False once
        it is over (finished and pumped, or terminal) with no send reading: once DONE,
        as soon as the pump is past its END; after a failure, once the sends in flight
        have completed or failed. Whoever holds the blocks may free them only then."""
        with self._book.lock:
            return transfer_id in self._book.unreleased

    @property
    def num_reading(self) -> int:
        """Transfers whose source blocks a send may still read (active ones included)."""
        with self._book.lock:
            return len(self._book.unreleased)

    def abort(self, transfer_id: str, reason: str = "aborted") -> None:
        with self._book.lock:
            out = self._book.active.get(transfer_id)
        if out is not None:
            self._pump.fail(out, reason)

    @property
    def num_active(self) -> int:
        with self._book.lock:
            return len(self._book.active)

    def close(self) -> None:
        with self._book.lock:
            if self._book.closed:
                return
            self._book.closed = True
            outs = list(self._book.active.values())
        for out in outs:
            self._pump.fail(out, "sender closed", notify=False)
        self._pump.close(timeout_s=self._cfg.op_timeout_s)
