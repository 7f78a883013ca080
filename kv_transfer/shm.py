"""The same-host transport: senders write straight into the decode cache in shared memory.

The decode rank's KV cache lives in a file under /dev/shm (`ShmSegment`; give the
engine `ShmKVStorage` as its kv_storage), followed by a slot table:

    [0, cache bytes)     the KV cache tensor, exactly as engine/kv_cache.py lays it out
    [cache bytes, end)   slots x int32 rows: state, generation, first block, block count,
                         transfer id (64 bytes), 4 spare words, block ids

A transfer's slot is the first free one from a home slot that its id hashes to, so that
a sender finds it by reading a row or two, not by scanning the table.

Receiver (`ShmEndpoint`): `expect` fills a free slot and sets it OPEN last. `revoke`
takes the file's exclusive flock and frees the slot, so once it returns no sender can
write into the transfer's blocks. The control listener is an abstract Unix socket.

Sender link, per pair: maps the file and connects the control socket. Per DATA
message, under a shared flock, it finds the transfer's OPEN slot, looks up the
destination blocks there, and copies the source region (or a span of consecutive
layers) straight into them (one copy, like CUDA IPC within a node); then it writes the
header, which tells the receiver the slice is complete. The receiver verifies the
checksum in place. A sender can only write into blocks of a slot the receiver opened,
within that slot's block range.

Segments are named `pdkv-<pid>-<random>`; `sweep_stale_segments` removes those whose
creating process is gone (a receiver that was killed cannot unlink its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import mmap
import os
import re
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from engine.config import parse_dtype
from engine.kv_cache import KVCacheLayout
from kv_transfer.base import MAX_TRANSFER_ID_BYTES, LocalRank, RankId, RecvSpec, TransferError
from kv_transfer.control import ControlClient, ControlServer, Finish, listen
from kv_transfer.header import TOKEN_BYTES, Header, Hello
from kv_transfer.mapping import KVGeometry
from kv_transfer.regions import BlockRegion, LayerSpan, copy_into, region_of
from kv_transfer.rendezvous import Lease, RendezvousStore, encode_record, rank_key, resolve
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

TRANSPORT = TransportKind.SHM
SHM_DIR = Path("/dev/shm")
_NAME = re.compile(r"^pdkv-(\d+)-[0-9a-f]{16}$")
_FREE, _OPEN = 0, 1
_HEAD_WORDS = 24  # state, generation, first block, count, 16 id words, 4 spare
_ID_WORDS = MAX_TRANSFER_ID_BYTES // 4
_ROW_HEAD = struct.Struct(f"<4i{MAX_TRANSFER_ID_BYTES}s")  # state .. transfer id
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


def _id_bytes(transfer_id: str) -> bytes:
    return transfer_id.encode().ljust(MAX_TRANSFER_ID_BYTES, b"\x00")


@dataclass(frozen=True)
class OpenSlot:
    """A transfer's slot as a sender found it: its row and block range."""

    slot: int
    first_block: int
    block_count: int


def _flock(fd: int, op: int, timeout_s: float) -> bool:
    """Take a flock with a bounded wait; False if it timed out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() > deadline:
                return False
            time.sleep(1e-4)


def sweep_stale_segments(directory: Path = SHM_DIR) -> list[Path]:
    """Unlink segments whose creating process no longer exists."""
    removed = []
    for path in directory.glob("pdkv-*"):
        m = _NAME.match(path.name)
        if m is None:
            continue
        try:
            os.kill(int(m.group(1)), 0)
        except ProcessLookupError:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
        except PermissionError:
            pass  # alive, someone else's
    return removed


class ShmSegment:
    """A KV cache plus its slot table in one shared file, mapped into this process."""

    def __init__(self, path: Path, layout: KVCacheLayout, max_slots: int, create: bool) -> None:
        self.path, self.layout, self.max_slots = path, layout, max_slots
        self._row = _HEAD_WORDS + layout.num_blocks
        size = layout.total_bytes + 4 * max_slots * self._row
        self._table = layout.total_bytes  # byte offset of the slot table
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        self.fd = os.open(path, flags, 0o600)
        try:
            if create:
                os.ftruncate(self.fd, size)
            elif os.fstat(self.fd).st_size != size:
                raise TransferError(f"{path} is not a segment of the advertised layout")
            self._map = mmap.mmap(self.fd, size, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE)
        except BaseException:
            os.close(self.fd)
            if create:
                path.unlink(missing_ok=True)
            raise
        whole = torch.frombuffer(self._map, dtype=torch.uint8)
        self.cache_bytes = whole[: layout.total_bytes]
        self.cache = self.cache_bytes.view(layout.dtype).view(layout.shape)
        # The slot table as numpy: its few-element reads and writes cost far less there.
        self.slots = (
            whole[layout.total_bytes :].view(torch.int32).view(max_slots, self._row).numpy()
        )

    @classmethod
    def create(cls, layout: KVCacheLayout, max_slots: int = 64) -> ShmSegment:
        if max_slots < 1:
            raise ValueError(f"max_slots must be >= 1, got {max_slots}")
        sweep_stale_segments()
        name = f"pdkv-{os.getpid()}-{os.urandom(8).hex()}"
        return cls(SHM_DIR / name, layout, max_slots, create=True)

    def probe(self, transfer_id: str) -> Iterator[int]:
        """Every slot, starting from the one `transfer_id` hashes to."""
        home = zlib.crc32(transfer_id.encode()) % self.max_slots
        return ((home + i) % self.max_slots for i in range(self.max_slots))

    def find_open(self, transfer_id: str) -> OpenSlot | None:
        """The transfer's OPEN slot, read from the table row by row from its home."""
        key = _id_bytes(transfer_id)
        for slot in self.probe(transfer_id):
            state, _, first, count, tid = _ROW_HEAD.unpack_from(self._map, self._offset(slot))
            if state == _OPEN and tid == key and 0 <= count <= self.layout.num_blocks:
                return OpenSlot(slot, first, count)
        return None

    def block_ids(self, found: OpenSlot, start: int, count: int) -> tuple[int, ...]:
        """Destination blocks `start .. start + count` of a slot's reservation."""
        offset = self._offset(found.slot) + 4 * (_HEAD_WORDS + start)
        return struct.unpack_from(f"<{count}i", self._map, offset)

    def _offset(self, slot: int) -> int:
        return self._table + 4 * self._row * slot

    def unlink(self) -> None:
        """Remove the name; the memory lives on while mappings do."""
        self.path.unlink(missing_ok=True)

    def close_mapping(self) -> None:
        """Drop this process's file handle, keeping the name (what a sender does)."""
        if self.fd >= 0:
            with contextlib.suppress(OSError):
                os.close(self.fd)
            self.fd = -1

    def close(self) -> None:
        """Unlink and drop the handle (what the creator does)."""
        self.unlink()
        self.close_mapping()


class ShmKVStorage:
    """`kv_storage` for the decode engine: the cache is allocated in a new segment."""

    def __init__(self, max_slots: int = 64) -> None:
        self.max_slots = max_slots
        self.segment: ShmSegment | None = None

    def __call__(self, layout: KVCacheLayout) -> torch.Tensor:
        if self.segment is not None:
            raise RuntimeError("ShmKVStorage already holds a cache")
        self.segment = ShmSegment.create(layout, self.max_slots)
        return self.segment.cache_bytes


@dataclass(frozen=True)
class ShmConfig:
    connect_timeout_s: float = 10.0
    lock_timeout_s: float = 5.0  # waiting for a flock (a writer holds it for one copy)
    ttl_s: float = 10.0

    def __post_init__(self) -> None:
        if min(self.connect_timeout_s, self.lock_timeout_s, self.ttl_s) <= 0:
            raise ValueError(f"timeouts must be > 0: {self}")


def _nothing() -> None:
    return None


class _InPlace:
    direct_ok = False  # senders have written the payload before its header arrives

    def start(self, header: Header, target: Target | None) -> Finish:
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
        self._server = ControlServer(
            listener, inbox, lambda peer: _InPlace(), self._cfg.connect_timeout_s, str(me.id)
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
        row[4 : 4 + _ID_WORDS] = np.frombuffer(_id_bytes(spec.transfer_id), dtype=np.int32)
        n = len(spec.block_ids)
        row[_HEAD_WORDS : _HEAD_WORDS + n] = spec.block_ids
        row[1] += 1
        row[0] = _OPEN  # last: a sender only trusts an OPEN slot

    def revoke(self, transfer_id: str) -> None:
        with self._lock:
            slot = self._slot_of.pop(transfer_id, None)
        if slot is None:
            return
        locked = _flock(self._seg.fd, fcntl.LOCK_EX, self._cfg.lock_timeout_s)
        if not locked:
            logger.error(
                "transfer %s: a sender held the cache lock for over %gs; revoking without it",
                transfer_id,
                self._cfg.lock_timeout_s,
            )
        try:
            row = self._seg.slots[slot]
            row[0] = _FREE
            row[1] += 1
            row[4 : 4 + _ID_WORDS] = 0
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
        return self._broken

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
        if not _flock(self._seg.fd, fcntl.LOCK_SH, self._lock_timeout):
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

    def connect(self, me: LocalRank, peer: RankId) -> Link:
        rec = resolve(self._store, TRANSPORT, peer, _RECORD)
        if rec["boot_id"] != _boot_id():
            raise TransferError(f"{peer} is on another host; shm needs the same host")
        path = Path(rec["path"])
        if path.parent != SHM_DIR or not _NAME.match(path.name):
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
            control = ControlClient(rec["control"], hello, self._cfg.connect_timeout_s)
        except TransferError:
            segment.close_mapping()
            raise
        return _ShmLink(
            peer, control, segment, rec["layer_start"], rec["head_start"], self._cfg.lock_timeout_s
        )
