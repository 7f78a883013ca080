"""A decode rank's KV cache in shared memory, and the slot table senders find transfers in.

The decode rank's KV cache lives in a file under /dev/shm (`ShmSegment`; give the
engine `ShmKVStorage` as its kv_storage), followed by a slot table:

    [0, cache bytes)     the KV cache tensor, exactly as engine/kv_cache.py lays it out
    [cache bytes, end)   slots x int32 rows: state, generation, first block, block count,
                         transfer id (64 bytes), 4 spare words, block ids

A transfer's slot is the first free one from a home slot that its id hashes to, so that
a sender finds it by reading a row or two, not by scanning the table.

Segments are named `pdkv-<pid>-<random>`; `sweep_stale_segments` removes those whose
creating process is gone (a receiver that was killed cannot unlink its own).
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from engine.kv_cache import KVCacheLayout
from kv_transfer.base import MAX_TRANSFER_ID_BYTES, TransferError

SHM_DIR = Path("/dev/shm")
SEGMENT_NAME = re.compile(r"^pdkv-(\d+)-[0-9a-f]{16}$")
FREE, OPEN = 0, 1
HEAD_WORDS = 24  # state, generation, first block, count, 16 id words, 4 spare
ID_WORDS = MAX_TRANSFER_ID_BYTES // 4
_ROW_HEAD = struct.Struct(f"<4i{MAX_TRANSFER_ID_BYTES}s")  # state .. transfer id


def id_bytes(transfer_id: str) -> bytes:
    return transfer_id.encode().ljust(MAX_TRANSFER_ID_BYTES, b"\x00")


@dataclass(frozen=True)
class OpenSlot:
    """A transfer's slot as a sender found it: its row and block range."""

    slot: int
    first_block: int
    block_count: int


def flock(fd: int, op: int, timeout_s: float) -> bool:
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
        m = SEGMENT_NAME.match(path.name)
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
        self._row = HEAD_WORDS + layout.num_blocks
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
        key = id_bytes(transfer_id)
        for slot in self.probe(transfer_id):
            state, _, first, count, tid = _ROW_HEAD.unpack_from(self._map, self._offset(slot))
            if state == OPEN and tid == key and 0 <= count <= self.layout.num_blocks:
                return OpenSlot(slot, first, count)
        return None

    def block_ids(self, found: OpenSlot, start: int, count: int) -> tuple[int, ...]:
        """Destination blocks `start .. start + count` of a slot's reservation."""
        offset = self._offset(found.slot) + 4 * (HEAD_WORDS + start)
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
