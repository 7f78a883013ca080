"""The receiver role: one per decode rank, over any transport's `Endpoint`.

Lifecycle of one transfer on one receiver rank:

    expect(spec)          PENDING: the plan says which (sender rank, layer) slices with
                          which heads will come; each stream starts at `spec.first_block`.
                          The deadline starts.
    DATA header           `prepare`: validated against the plan and the stream position
                          (a gap means a lost message) before any byte of the payload
                          moves; yields the destination region
    DATA payload          received into staging, straight into the destination blocks
                          (torch_dist, without a checksum), or already there (shm)
    landing               `land`: staging scattered and its checksum verified in the
                          same pass (else the blocks' checksum verified) -> TRANSFERRING
    every slice landed    DONE; with `spec.first_token`, once an END has also brought
                          the prompt's first token, which DONE's status carries
    mismatch / ABORT /    FAILED(reason)
    END with gaps /
    connection lost /
    deadline / abort()

With a `registry` (the rendezvous store), `expect` publishes the transfer as open for
this rank, and its end withdraws the record: a sender waits (bounded) for the record
before its first slice to this rank, so the decode side may register after the
prefill starts.
`refuse(transfer_id, reason)` publishes a transfer this rank will not take, so that
its sender fails at once rather than at its deadline.

`on_end(transfer_id, status)`, when given, is called once per transfer that `expect`
accepted, as soon as it is terminal, on the thread that ended it (a transport thread,
the watchdog, or the caller of `abort`/`close`): it must not block nor call back into
the receiver. The caller learns completion from it instead of polling. `on_record`,
likewise, gets the transfer's figures (bytes and blocks landed, duration) for metrics.

A terminal transfer first waits for payloads being received straight into its blocks,
then is revoked at the endpoint, and only then changes state: once `poll` reports DONE
or FAILED no write into its blocks can follow, and the caller may free or reuse them.
Messages for unknown or terminal transfers are dropped. A watchdog thread enforces
deadlines even when nobody polls. A DATA message whose header carries a trace context
is recorded as a `kv.land` span (its landing) under the sender's `kv.message`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.kv_cache import KVCache
from kv_transfer.base import (
    DONE,
    TRANSFERRING,
    LocalRank,
    RecordSink,
    RecvSpec,
    TransferStatus,
    failed,
)
from kv_transfer.header import Header, MessageKind
from kv_transfer.inbound import Inbound, InboundTarget
from kv_transfer.mapping import KVGeometry, plan, routes_to
from kv_transfer.region_copies import scatter_checksummed
from kv_transfer.registration import RecordWriter, Registration
from kv_transfer.rendezvous import RendezvousStore
from kv_transfer.transport import Endpoint, Peer, Target
from telemetry import request_scope, tracing
from telemetry.context import REQUEST_ID

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ReceiverConfig:
    verify: bool | None = None  # verify checksums that senders send; None: on for CPU
    tick_s: float = 0.05  # watchdog period
    history: int = 4096  # terminal states remembered for poll()
    drain_timeout_s: float = 30.0  # longest wait for in-flight direct writes when ending
    record_ttl_s: float = 120.0  # how long a transfer's registry record lives at most

    def __post_init__(self) -> None:
        if self.tick_s <= 0 or self.history < 1 or self.drain_timeout_s <= 0:
            raise ValueError(f"invalid ReceiverConfig {self}")


class KVReceiver:
    """Lands KV slices from prefill ranks in this decode rank's preallocated blocks."""

    def __init__(
        self,
        me: LocalRank,
        cache: KVCache,
        geometry: KVGeometry,
        endpoint: Endpoint,
        config: ReceiverConfig = ReceiverConfig(),
        registry: RendezvousStore | None = None,
        on_end: Callable[[str, TransferStatus], None] | None = None,
        on_record: RecordSink | None = None,
    ) -> None:
        self.me, self._geo, self._endpoint, self._cfg = me, geometry, endpoint, config
        self._on_end, self._on_record = on_end, on_record
        self._records = (
            RecordWriter(registry, me.instance, me.rank, config.record_ttl_s)
            if registry is not None
            else None
        )
        self._cache = cache.tensor
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
        self._verify = self._cache.device.type == "cpu" if config.verify is None else config.verify
        self._max_payload = self._cache[0].numel() * self._cache.element_size()
        self._lock = threading.Lock()
        self._active: dict[str, Inbound] = {}
        self._history: OrderedDict[str, TransferStatus] = OrderedDict()
        self._closed = threading.Event()
        endpoint.start(me, self._cache, self)
        self._watchdog = threading.Thread(target=self._watch, name="kv-receiver", daemon=True)
        self._watchdog.start()

    # ---- the role's surface -------------------------------------------------------

    def expect(self, spec: RecvSpec) -> None:
        num_blocks = self._cache.shape[2]
        if max(spec.block_ids) >= num_blocks:
            raise ValueError(f"block id {max(spec.block_ids)} >= num_blocks {num_blocks}")
        routes = routes_to(plan(self._geo, spec.source.parallel, self.me.parallel), self.me.rank)
        inb = Inbound.planned(spec, routes, self._layers, time.monotonic() + spec.timeout_s)
        inb.request_id = REQUEST_ID.get()  # the caller's (bound on the request path)
        with self._lock:
            if self._closed.is_set():
                raise RuntimeError("receiver is closed")
            if spec.transfer_id in self._active or spec.transfer_id in self._history:
                raise ValueError(f"transfer {spec.transfer_id!r} already exists")
            self._endpoint.expect(spec)
            self._active[spec.transfer_id] = inb
        self._publish(spec.transfer_id, Registration.OPEN)

    def refuse(self, transfer_id: str, reason: str) -> None:
        """Tell the transfer's sender that this rank will not take it."""
        logger.info("refusing transfer %s: %s", transfer_id, reason)
        self._publish(transfer_id, Registration.REFUSED)

    def _publish(self, transfer_id: str, state: Registration) -> None:
        if self._records is not None:
            self._records.publish(transfer_id, state)

    def poll(self, transfer_id: str) -> TransferStatus:
        with self._lock:
            inb = self._active.get(transfer_id)
            if inb is None:
                if transfer_id not in self._history:
                    raise KeyError(f"unknown transfer {transfer_id!r}")
                return self._history[transfer_id]
        # A late transfer ends here unless that would wait; the watchdog does it then.
        late = time.monotonic() > inb.deadline and not inb.writing
        if late and inb.lock.acquire(blocking=False):
            try:
                if not inb.writing:
                    self._end_locked(inb, inb.timeout_status())
            finally:
                inb.lock.release()
        return inb.status

    def abort(self, transfer_id: str, reason: str = "aborted") -> None:
        """FAILED now. Waits for a payload being received straight into the transfer's
        blocks (bounded by the transport's operation timeout)."""
        with self._lock:
            inb = self._active.get(transfer_id)
        if inb is not None:
            self._fail(inb, reason)

    @property
    def num_active(self) -> int:
        with self._lock:
            return len(self._active)

    @property
    def endpoint(self) -> Endpoint:
        return self._endpoint

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._watchdog.join(timeout=5 * self._cfg.tick_s + 1.0)
        with self._lock:
            inbs = list(self._active.values())
        for inb in inbs:
            self._fail(inb, "receiver closed")
        self._endpoint.close()
        if self._records is not None:
            self._records.close()

    # ---- the Inbox the endpoint calls ----------------------------------------------

    @property
    def max_payload_bytes(self) -> int:
        return self._max_payload

    @property
    def max_payload_layers(self) -> int:
        return len(self._layers)

    def prepare(self, peer: Peer, header: Header, direct_ok: bool) -> Target | None:
        """Validate a DATA header; its destination, or None to drop the payload."""
        with self._lock:
            inb = self._active.get(header.transfer_id)
        if inb is None:
            logger.debug("dropping DATA for inactive %s from %s", header.transfer_id, peer.id)
            return None
        with inb.lock:
            if inb.status.terminal or inb.ending:
                return None
            if not inb.from_source(peer):
                self._end_locked(inb, failed(f"unexpected sender {peer.id} ({peer.parallel})"))
                return None
            found = inb.destination(
                self._cache, self._layers.start, self._heads.start, peer, header
            )
            if isinstance(found, str):
                self._end_locked(inb, failed(f"from {peer.id}: {found}"))
                return None
            region, stream, layers = found
            n = layers.stop - layers.start
            stream.cursor[layers] = [header.block_start + header.block_count] * n
            inb.peers.add(peer)
            direct = direct_ok and header.parts and region.dense
            if direct:
                inb.writing += 1
            return InboundTarget(region, direct, inb, stream, layers)

    def written(self, target: Target) -> None:
        """A direct receive into `target` has stopped writing (done or failed)."""
        assert isinstance(target, InboundTarget)
        with target.inbound.drained:
            target.inbound.writing -= 1
            target.inbound.drained.notify_all()

    def land(
        self, peer: Peer, header: Header, target: Target | None, payload: torch.Tensor | None
    ) -> None:
        """A message has arrived, in order: DATA (with its `prepare` target), END or ABORT."""
        if header.kind is MessageKind.DATA:
            if target is not None:
                assert isinstance(target, InboundTarget)
                start = tracing.now_ns() if header.trace is not None else 0
                self._land(peer, header, target, payload)
                if start:
                    attrs = {"layer": header.layer, "layers": header.layer_count}
                    tracing.record("kv.land", header.trace, start, tracing.now_ns(), attrs)
            return
        with self._lock:
            inb = self._active.get(header.transfer_id)
        if inb is None:
            return
        if not inb.from_source(peer):
            self._fail(inb, f"unexpected sender {peer.id} ({peer.parallel})")
        elif header.kind is MessageKind.ABORT:
            self._fail(inb, f"sender {peer.id} aborted")
        elif header.kind is MessageKind.END:
            with inb.lock:
                missing = inb.missing_from(peer.id.rank)
                if missing:
                    self._end_locked(
                        inb,
                        failed(f"sender {peer.id} ended with {missing} layer slices incomplete"),
                    )
                elif header.first is not None and inb.first is None:
                    inb.first = header.first
                    if inb.remaining == 0:
                        self._end_locked(inb, DONE)

    def on_peer_lost(self, peer: Peer, reason: str) -> None:
        with self._lock:
            inbs = [inb for inb in self._active.values() if peer in inb.peers]
        for inb in inbs:
            with inb.lock:
                if inb.missing_from(peer.id.rank):
                    self._end_locked(inb, failed(f"lost sender {peer.id}: {reason}"))

    # ---- landing ----------------------------------------------------------------------

    def _land(
        self, peer: Peer, h: Header, target: InboundTarget, payload: torch.Tensor | None
    ) -> None:
        inb, region = target.inbound, target.region
        verify = self._verify and h.checksum is not None
        mismatch = (
            f"checksum mismatch in layer {h.layer} blocks {h.block_start}.."
            f"{h.block_start + h.block_count - 1} from {peer.id}"
        )
        # A payload already in place is verified outside the lock: reading blocks of a
        # transfer that ends meanwhile is harmless, and its result is then ignored.
        in_place = payload is None and not inb.status.terminal
        if verify and in_place and region.checksum() != h.checksum:
            self._fail(inb, mismatch)
            return
        with inb.lock:
            if inb.status.terminal or inb.ending:
                return
            if payload is not None:
                # A staged payload is summed as it is scattered (one read of it). Blocks
                # of a mismatch hold garbage, but the transfer fails and never decodes.
                if verify:
                    if scatter_checksummed(region, payload) != h.checksum:
                        self._end_locked(inb, failed(mismatch))
                        return
                else:
                    region.scatter(payload)
                if payload.is_cuda:  # landed before DONE, and before the buffer is reused
                    torch.cuda.current_stream(payload.device).synchronize()
            if inb.first_landed is None:
                inb.first_landed = time.monotonic()
            inb.landed_bytes += h.nbytes
            inb.block_end = max(inb.block_end, h.block_start + h.block_count)
            landed = [n + h.block_count for n in target.stream.landed[target.layers]]
            target.stream.landed[target.layers] = landed
            inb.remaining -= landed.count(inb.total)  # each message adds blocks: newly full
            if inb.remaining == 0 and (inb.first is not None or not inb.spec.first_token):
                self._end_locked(inb, DONE)
            else:
                inb.status = TRANSFERRING

    # ---- endings ------------------------------------------------------------------------

    def _end_locked(self, inb: Inbound, status: TransferStatus) -> None:
        """Drain direct writes, revoke, then publish the terminal state. Holds `inb.lock`."""
        if inb.status.terminal or inb.ending:
            return
        inb.ending = True
        if not inb.drained.wait_for(lambda: inb.writing == 0, self._cfg.drain_timeout_s):
            logger.error(
                "transfer %s: a payload is still being written into its blocks",
                inb.spec.transfer_id,
            )
        try:
            self._endpoint.revoke(inb.spec.transfer_id)
        except Exception:
            logger.exception("revoking transfer %s", inb.spec.transfer_id)
        if status.reason is None:
            status = status.with_first(inb.first)
        inb.status = status = status.ended_now()
        tid = inb.spec.transfer_id
        with self._lock:
            self._active.pop(tid, None)
            self._history[tid] = status
            while len(self._history) > self._cfg.history:
                self._history.popitem(last=False)
        if status.reason is not None:
            with request_scope(inb.request_id):
                logger.warning(
                    "transfer %s failed on receiver %s: %s", tid, self.me.id, status.reason
                )
        if self._on_end is not None:
            try:
                self._on_end(tid, status)
            except Exception:
                logger.exception("transfer %s: on_end failed", tid)
        if self._on_record is not None:
            self._report(inb, status)
        if self._records is not None:
            self._records.withdraw(tid)

    def _report(self, inb: Inbound, status: TransferStatus) -> None:
        assert self._on_record is not None
        try:
            self._on_record(inb.record(status))
        except Exception:
            logger.exception("transfer %s: on_record failed", inb.spec.transfer_id)

    def _fail(self, inb: Inbound, reason: str) -> None:
        with inb.lock:
            self._end_locked(inb, failed(reason))

    def _watch(self) -> None:
        while not self._closed.wait(self._cfg.tick_s):
            now = time.monotonic()
            with self._lock:
                late = [inb for inb in self._active.values() if now > inb.deadline]
            for inb in late:
                with inb.lock:
                    self._end_locked(inb, inb.timeout_status())
