"""The same-host transport: senders write straight into the decode cache in shared memory.

The decode rank's KV cache lives in a shared file with a slot table
(kv_transfer/shm_segment.py: `ShmSegment`; give the engine `ShmKVStorage` as its
kv_storage).

Receiver (`ShmEndpoint`): `expect` fills a free slot and sets it OPEN last. `revoke`
takes the file's exclusive flock and frees the slot, so once it returns no sender can
write into the transfer's blocks. The control listener is an abstract Unix socket.

Sender link, per pair: maps the file and connects the control socket. Per DATA
message, under a shared flock, it finds the transfer's OPEN slot, looks up the
destination blocks there, and copies the source region (or a span of consecutive
layers) straight into them (one copy, like CUDA IPC within a node); then it writes the
header, which tells the receiver the slice is complete. The receiver verifies the
checksum in place, and refuses a DATA message without one (`require_checksum`): what a
sender wrote into this process's memory is always checked. A sender can only write into
blocks of a slot the receiver opened, within that slot's block range.

Who may connect: the segment file is mode 0600, and the control socket admits only
processes of the same user (or `peer_uid`), by the credentials the kernel records for
the connection (SO_PEERCRED), before it reads a byte; with the cluster secret the HELLO
is sealed as on every control channel (kv_transfer.auth).
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from engine.config import parse_dtype
from engine.kv_cache import KVCacheLayout
from kv_transfer.auth import HelloAuth
from kv_transfer.base import (
    LocalRank,
    ProtocolError,
    RankId,
    RecvSpec,
    TransferError,
)
from kv_transfer.control import ControlClient, ControlServer, Finish, listen
from kv_transfer.guard import (
    DEFAULT_IDLE_TIMEOUT_S,
    DEFAULT_MAX_CONNECTIONS,
    same_user,
    server_guard,
)
from kv_transfer.header import TOKEN_BYTES, Header, Hello
from kv_transfer.mapping import KVGeometry
from kv_transfer.region_copies import copy_into
from kv_transfer.regions import BlockRegion, LayerSpan, region_of
from kv_transfer.rendezvous import Lease, RendezvousStore, encode_record, rank_key, resolve
from kv_transfer.shm_segment import (
    FREE,
    HEAD_WORDS,
    ID_WORDS,
    OPEN,
    SEGMENT_NAME,
    SHM_DIR,
    ShmKVStorage,
    ShmSegment,
    flock,
    id_bytes,
    sweep_stale_segments,
)
from kv_transfer.transport import (
    Completion,
    Connector,
    Endpoint,
    Inbox,
    Link,
    Target,
    TransportKind,
)

logger = logging.getLogger(__name__)

__all__ = [
    "ShmConfig",
    "ShmConnector",
    "ShmEndpoint",
    "ShmKVStorage",
    "ShmSegment",
    "sweep_stale_segments",
]

TRANSPORT = TransportKind.SHM
_RECORD = {
    "control": str,
    "path": str,
    "boot_id": str,
    "num_layers": int,
    "num_kv_heads": int,
    "head_dim": int,
    "block_size": int,
    "num_blocks": int,
    "dtype": str,
    "max_slots": int,
    "layer_start": int,
    "head_start": int,
}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return "unknown"


@dataclass(frozen=True)
class ShmConfig:
    connect_timeout_s: float = 10.0
    lock_timeout_s: float = 5.0  # waiting for a flock (a writer holds it for one copy)
    ttl_s: float = 10.0
    secret: bytes | None = field(default=None, repr=False)  # seals HELLOs (auth.py)
    peer_uid: int | None = None  # the user senders run as; None: this process's user
    require_checksum: bool = True  # refuse DATA messages that carry no checksum
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S  # after HELLO; senders reconnect at half

    def __post_init__(self) -> None:
        timeouts = (self.connect_timeout_s, self.lock_timeout_s, self.ttl_s, self.idle_timeout_s)
        if min(timeouts) <= 0:
            raise ValueError(f"timeouts must be > 0: {self}")
        if self.max_connections < 1:
            raise ValueError(f"max_connections must be >= 1: {self}")


def _nothing() -> None:
    return None


class _InPlace:
    direct_ok = False  # senders have written the payload before its header arrives

    def __init__(self, require_checksum: bool) -> None:
        self._require_checksum = require_checksum

    def start(self, header: Header, target: Target | None) -> Finish:
        if self._require_checksum and header.checksum is None:
            raise ProtocolError(
                f"DATA for {header.transfer_id} without a checksum: what senders write "
                "into this receiver's memory is always verified"
            )
        return _nothing

    def done(self, payload: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class ShmEndpoint(Endpoint):
    """A decode rank whose cache is `segment.cache`; senders on this host write into it."""

    def __init__(
        self,
        store: RendezvousStore,
        segment: ShmSegment,
        geometry: KVGeometry,
        config: ShmConfig = ShmConfig(),
    ) -> None:
        self._store, self._seg, self._geo, self._cfg = store, segment, geometry, config
        self._lock = threading.Lock()
        self._free = set(range(segment.max_slots))
        self._slot_of: dict[str, int] = {}
        self._server: ControlServer | None = None
        self._lease: Lease | None = None

    @property
    def num_connections(self) -> int:
        return self._server.num_connections if self._server else 0

    @property
    def num_slots(self) -> int:
        return self._seg.max_slots

    @property
    def num_free_slots(self) -> int:
        with self._lock:
            return len(self._free)

    def start(self, me: LocalRank, cache: torch.Tensor, inbox: Inbox) -> None:
        if cache.data_ptr() != self._seg.cache.data_ptr() or cache.shape != self._seg.cache.shape:
            raise ValueError("the receiver's cache must be the segment's cache")
        listener, address = listen(f"unix:@pdkv-{os.getpid()}-{os.urandom(8).hex()}")
        cfg = self._cfg
        self._server = ControlServer(
            listener,
            inbox,
            lambda peer: _InPlace(cfg.require_checksum),
            cfg.connect_timeout_s,
            str(me.id),
            guard=server_guard(
                cfg.secret,
                address,
                max_connections=cfg.max_connections,
                idle_timeout_s=cfg.idle_timeout_s,
                check_peer=same_user(cfg.peer_uid),
            ),
        )
        lay = self._seg.layout
        record = encode_record(
            control=address,
            path=str(self._seg.path),
            boot_id=_boot_id(),
            num_layers=lay.num_layers,
            num_kv_heads=lay.num_kv_heads,
            head_dim=lay.head_dim,
            block_size=lay.block_size,
            num_blocks=lay.num_blocks,
            dtype=str(lay.dtype),
            max_slots=self._seg.max_slots,
            layer_start=self._geo.layers(me.parallel, me.pp_rank).start,
            head_start=self._geo.heads(me.parallel, me.tp_rank).start,
        )
        self._lease = Lease(self._store, rank_key(TRANSPORT, me.id), record, self._cfg.ttl_s)

    def expect(self, spec: RecvSpec) -> None:
        if len(spec.block_ids) > self._seg.layout.num_blocks:
            raise ValueError("more blocks than the cache holds")
        with self._lock:
            if not self._free:
                raise RuntimeError(f"all {self._seg.max_slots} transfer slots are in use")
            slot = next(s for s in self._seg.probe(spec.transfer_id) if s in self._free)
            self._free.discard(slot)
            self._slot_of[spec.transfer_id] = slot
        row = self._seg.slots[slot]
        row[2], row[3] = spec.first_block, len(spec.block_ids)
        row[4 : 4 + ID_WORDS] = np.frombuffer(id_bytes(spec.transfer_id), dtype=np.int32)
        n = len(spec.block_ids)
        row[HEAD_WORDS : HEAD_WORDS + n] = spec.block_ids
        row[1] += 1
        row[0] = OPEN  # last: a sender only trusts an OPEN slot

    def revoke(self, transfer_id: str) -> None:
        with self._lock:
            slot = self._slot_of.pop(transfer_id, None)
        if slot is None:
            return
        locked = flock(self._seg.fd, fcntl.LOCK_EX, self._cfg.lock_timeout_s)
        if not locked:
            logger.error(
                "transfer %s: a sender held the cache lock for over %gs; revoking without it",
                transfer_id,
                self._cfg.lock_timeout_s,
            )
        try:
            row = self._seg.slots[slot]
            row[0] = FREE
            row[1] += 1
            row[4 : 4 + ID_WORDS] = 0
        finally:
            if locked:
                fcntl.flock(self._seg.fd, fcntl.LOCK_UN)
        with self._lock:
            self._free.add(slot)

    def close(self) -> None:
        if self._lease is not None:
            self._lease.close()
        if self._server is not None:
            self._server.close(timeout_s=self._cfg.connect_timeout_s)


class _ShmLink(Link):
    max_layers = 1 << 16  # copies are in place: one lock and one header for any span
    # No staging either, so spans run longer than over torch_dist: fewer messages, as
    # long as the receiver's checksum of the last span (which nothing overlaps) stays
    # short.
    max_span_bytes = 8 << 20

    def __init__(
        self,
        peer: RankId,
        control: ControlClient,
        segment: ShmSegment,
        layer_start: int,
        head_start: int,
        lock_timeout_s: float,
    ) -> None:
        self.peer = peer
        self._control, self._seg = control, segment
        self._layer0, self._head0, self._lock_timeout = layer_start, head_start, lock_timeout_s
        self._lock = threading.Lock()
        self._seq = 0
        self._broken = False

    @property
    def broken(self) -> bool:
        return self._broken or self._control.stale

    def send(
        self, header: Header, region: BlockRegion | LayerSpan | None, checksum: bool = False
    ) -> Completion:
        with self._lock:
            if self._broken:
                raise TransferError(f"link to {self.peer} is closed")
            if region is not None:
                error, value = self._write(header, region, checksum)
                if error is not None:
                    return Completion.resolved(error)
                if value is not None:
                    header = header.with_checksum(value)
            header, self._seq = header.with_seq(self._seq), self._seq + 1
            try:
                self._control.send(header.pack())
            except TransferError:
                self._broken = True
                raise
        return Completion.resolved()

    def _write(
        self, header: Header, region: BlockRegion | LayerSpan, checksum: bool
    ) -> tuple[str | None, int | None]:
        """Copy `region` into the transfer's blocks, with its checksum when asked (taken
        in the same pass where the layout allows); or the reason it may not."""
        if not flock(self._seg.fd, fcntl.LOCK_SH, self._lock_timeout):
            return "timed out waiting for the receiver's cache lock", None
        try:
            found = self._seg.find_open(header.transfer_id)
            if found is None:
                return f"transfer {header.transfer_id} is not open at {self.peer}", None
            pos = header.block_start - found.first_block
            if pos < 0 or pos + header.block_count > found.block_count:
                where = f"{header.block_start}+{header.block_count}"
                return f"blocks {where} outside the reservation", None
            ids = self._seg.block_ids(found, pos, header.block_count)
            heads = header.head_start - self._head0
            try:
                layers = range(header.layer - self._layer0, header.layers.stop - self._layer0)
                dst = region_of(self._seg.cache, layers, heads, heads + header.head_count, ids)
                value = copy_into(dst, region, checksum)
            except (IndexError, ValueError) as e:
                return f"slice does not fit {self.peer}'s cache: {e}", None
            return None, value
        finally:
            fcntl.flock(self._seg.fd, fcntl.LOCK_UN)

    def close(self) -> None:
        with self._lock:
            self._broken = True
        self._control.close()
        self._seg.close_mapping()


class ShmConnector(Connector):
    """Opens links to receiver ranks on this host, found in the rendezvous store."""

    def __init__(self, store: RendezvousStore, config: ShmConfig = ShmConfig()) -> None:
        self._store, self._cfg = store, config
        self._auth = HelloAuth(config.secret) if config.secret is not None else None

    def connect(self, me: LocalRank, peer: RankId) -> Link:
        rec = resolve(self._store, TRANSPORT, peer, _RECORD)
        if rec["boot_id"] != _boot_id():
            raise TransferError(f"{peer} is on another host; shm needs the same host")
        path = Path(rec["path"])
        if path.parent != SHM_DIR or not SEGMENT_NAME.match(path.name):
            raise TransferError(f"{peer} advertised an unexpected segment path {path}")
        try:
            layout = KVCacheLayout(
                rec["num_layers"],
                rec["num_kv_heads"],
                rec["head_dim"],
                rec["block_size"],
                rec["num_blocks"],
                parse_dtype(rec["dtype"].removeprefix("torch.")),
            )
            segment = ShmSegment(path, layout, rec["max_slots"], create=False)
        except (OSError, ValueError) as e:
            raise TransferError(f"cannot map {peer}'s segment {path}: {e}") from e
        hello = Hello(me.instance, me.rank, me.parallel.tp, me.parallel.pp, os.urandom(TOKEN_BYTES))
        try:
            control = ControlClient(
                rec["control"],
                hello,
                self._cfg.connect_timeout_s,
                self._auth,
                max_idle_s=self._cfg.idle_timeout_s / 2,
            )
        except TransferError:
            segment.close_mapping()
            raise
        return _ShmLink(
            peer, control, segment, rec["layer_start"], rec["head_start"], self._cfg.lock_timeout_s
        )
