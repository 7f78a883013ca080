"""What a transport plugs into: links on the sender side, an endpoint on the receiver side.

The roles (`sender.KVSender`, `receiver.KVReceiver`) own every rule about transfers:
routes, ordering, checksums, deadlines and states. A transport only moves messages:

* A `Connector` opens a `Link` from this sender rank to one receiver rank. Links are
  created lazily on a transfer's first slice to that rank and reused until they break.
  `Link.send` moves one message; a DATA message's source region has been read by the
  time it returns (copied to staging, or written into the destination), and its
  `Completion` resolves once the message has been handed over.
* An `Endpoint` accepts connections on the receiver rank and hands each message to the
  receiver's `Inbox`, which validates a DATA header before its payload moves. The
  payload then goes to staging, straight into the destination blocks when they are
  contiguous and it carries no checksum (torch_dist), or is already there (shared
  memory).

Completions replace blocking waits: transports resolve them from their own threads and
the roles react in callbacks, so no caller ever waits on the network.
"""

from __future__ import annotations

import math
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

import torch

from kv_transfer.base import LocalRank, Parallelism, ProtocolError, RankId, RecvSpec
from kv_transfer.header import Header, MessageKind
from kv_transfer.regions import BlockRegion, LayerSpan
from kv_transfer.staging import StagingPool


class TransportKind(StrEnum):
    """The transports a cluster can configure (the in-process fake is for tests)."""

    TORCH_DIST = "torch_dist"  # Gloo for CPU tensors, NCCL for CUDA; any hosts
    SHM = "shm"  # a shared-memory segment; prefill and decode on one host


class Completion:
    """The outcome of one sent message: pending, done, or failed with a reason."""

    def __init__(self, holds_source: bool = False) -> None:
        # True when the transport reads the source blocks until this resolves
        # (zero-copy); the sender's finish(wait=True) then waits for it.
        self.holds_source = holds_source
        self._lock = threading.Lock()
        self._event = threading.Event()
        self._error: str | None = None
        self._callbacks: list[Callable[[Completion], None]] = []

    @classmethod
    def resolved(cls, error: str | None = None) -> Completion:
        c = cls()
        c.resolve(error)
        return c

    @property
    def done(self) -> bool:
        return self._event.is_set()

    @property
    def error(self) -> str | None:
        return self._error

    def resolve(self, error: str | None = None) -> None:
        """Mark done (or failed when `error` is set); the first call wins."""
        with self._lock:
            if self._event.is_set():
                return
            self._error = error
            self._event.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb(self)

    def add_done_callback(self, cb: Callable[[Completion], None]) -> None:
        """Run `cb` once resolved (at once, on this thread, if it already is)."""
        with self._lock:
            if not self._event.is_set():
                self._callbacks.append(cb)
                return
        cb(self)

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)


class Link(ABC):
    """The sender's end of one (sender rank -> receiver rank) pair."""

    peer: RankId
    # How many consecutive layers one DATA message may carry (a `LayerSpan` source).
    max_layers: int = 1
    # How many bytes a DATA message carries when the sender coalesces layers into it
    # (unless the sender's config sets its own size).
    max_span_bytes: int = 4 << 20

    @abstractmethod
    def send(
        self, header: Header, region: BlockRegion | LayerSpan | None, checksum: bool = False
    ) -> Completion:
        """Move one message (`region` is the source of a DATA message, else None; a
        `LayerSpan` of at most `max_layers` layers when `header.layer_count` > 1).

        With `checksum`, the link fills in `header.checksum` from the bytes it reads out
        of `region` (while they are hot in the cache). The link assigns `header.seq`.
        Raises TransferError when the link is broken; a later failure resolves the
        completion with an error instead.
        """

    @property
    @abstractmethod
    def broken(self) -> bool:
        """True once the link failed; the sender then drops it and reconnects."""

    @abstractmethod
    def close(self) -> None:
        """Tear the pair down (idempotent). Pending completions fail."""


class Connector(ABC):
    """A transport's sender side: opens links from one sender rank."""

    @abstractmethod
    def connect(self, me: LocalRank, peer: RankId) -> Link:
        """A fresh link to `peer`. Blocks for at most the transport's connect timeout."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the connector itself holds (links are closed by their owner)."""


@dataclass(frozen=True)
class Peer:
    """One connection from a sender rank, as its HELLO described it.

    `token` is random per connection, so a reconnecting rank is a new peer.
    """

    id: RankId
    parallel: Parallelism
    token: bytes


def staging_for(
    header: Header,
    max_bytes: int,
    max_layers: int,
    device: torch.device,
    pool: StagingPool | None = None,
) -> torch.Tensor:
    """An empty tensor to receive a DATA payload into; ProtocolError if implausible:
    more than `max_layers` layers, or more than `max_bytes` per layer."""
    numel = 1
    for d in header.shape:
        numel *= d
    elem = torch.empty((), dtype=header.dtype).element_size()
    span = header.layer_count > 1
    if header.kind is not MessageKind.DATA or len(header.shape) != 5 + span:
        raise ProtocolError(f"not a DATA header: {header.kind.name} {header.shape}")
    if span and header.shape[0] != header.layer_count:
        raise ProtocolError(f"shape {header.shape} for {header.layer_count} layers")
    if header.layer_count > max_layers:
        raise ProtocolError(f"{header.layer_count} layers in one message (limit {max_layers})")
    limit = max_bytes * header.layer_count
    if numel * elem != header.nbytes or not 0 < header.nbytes <= limit:
        raise ProtocolError(
            f"payload of {header.nbytes} bytes for shape {header.shape} (limit {limit})"
        )
    if pool is not None:
        return pool.take(header.shape, header.dtype, device)
    return torch.empty(header.shape, dtype=header.dtype, device=device)


@dataclass(eq=False)
class Target:
    """Where one validated DATA message lands: its destination region in the cache."""

    region: BlockRegion | LayerSpan
    direct: bool  # the endpoint receives the payload straight into `views()`

    def views(self) -> tuple[torch.Tensor, ...]:
        """The destinations of a direct target, in the order of `message_parts`."""
        return region_parts(self.region)


# A DATA payload moves whole, or as one part per layer and K/V (`Header.parts`), so
# that each part can land in place. A one-layer message always splits; a span only when
# its parts are at least this big (below, a message per part costs more than the
# scatter it saves).
MIN_SPAN_PART_BYTES = 256 << 10


def _splits(shape: tuple[int, ...], element_size: int) -> bool:
    return len(shape) == 5 or math.prod(shape[2:]) * element_size >= MIN_SPAN_PART_BYTES


def splits(region: BlockRegion | LayerSpan) -> bool:
    """Whether a message over `region` may move in parts (see MIN_SPAN_PART_BYTES)."""
    return _splits(region.shape, region.cache.element_size())


def in_parts(region: BlockRegion | LayerSpan, checksummed: bool) -> bool:
    """Whether a gathered message over `region` moves in parts: never with a checksum,
    which is then summed on landing as staging is scattered (one read of a buffer still
    in cache, where landing in place needs a second read of the blocks, and a message
    per part); else when it `splits`."""
    return not checksummed and splits(region)


def region_parts(region: BlockRegion | LayerSpan) -> tuple[torch.Tensor, ...]:
    """A dense region's or span's K then V of each layer in turn, each one contiguous
    view of the cache: where the parts of a message lie in place, at either end."""
    if not region.dense:
        raise ValueError("only a dense region lies in the cache as its parts")
    regions = region.regions if isinstance(region, LayerSpan) else (region,)
    parts: list[torch.Tensor] = []
    for r in regions:
        whole = r.run_view(r.block_ids[0], len(r.block_ids))
        parts += (whole[0], whole[1])
    return tuple(parts)


def message_parts(payload: torch.Tensor, parts: bool) -> tuple[torch.Tensor, ...]:
    """A contiguous DATA payload (`[2, ...]` for one layer, `[layers, 2, ...]` for a
    span) as the pieces a transport moves one by one: K then V of each layer in turn
    (`parts`), or the whole payload."""
    if not parts:
        return (payload,)
    return tuple(payload.reshape(-1, *payload.shape[-4:]).unbind(0))


class Inbox(Protocol):
    """The receiver role as endpoints see it. Called on endpoint threads, in order per
    connection: `prepare` when a DATA header arrives, `written` once a direct receive
    stops writing, `land` for every message once its payload is in."""

    @property
    def max_payload_bytes(self) -> int:
        """No valid DATA payload holds more per layer; endpoints reject larger ones."""
        ...

    @property
    def max_payload_layers(self) -> int:
        """No valid DATA message spans more layers (the layers this rank holds)."""
        ...

    def prepare(self, peer: Peer, header: Header, direct_ok: bool) -> Target | None:
        """Validate a DATA header before its payload moves; None: drop the payload.

        With `direct_ok`, the target may be direct: the endpoint then receives into
        `target.views()` and must call `written(target)` when that stops, however it ends.
        """
        ...

    def written(self, target: Target) -> None: ...

    def land(
        self, peer: Peer, header: Header, target: Target | None, payload: torch.Tensor | None
    ) -> None:
        """DATA (staged `payload`, or None when direct or in place), END or ABORT."""
        ...

    def on_peer_lost(self, peer: Peer, reason: str) -> None:
        """`peer`'s connection ended; what it still owed will never come."""
        ...


class Endpoint(ABC):
    """A transport's receiver side for one receiver rank."""

    @abstractmethod
    def start(self, me: LocalRank, cache: torch.Tensor, inbox: Inbox) -> None:
        """Start accepting senders and publish this rank's address."""

    def expect(self, spec: RecvSpec) -> None:  # noqa: B027 - optional hook
        """A transfer was registered (shared memory opens a slot for it)."""

    def revoke(self, transfer_id: str) -> None:  # noqa: B027 - optional hook
        """The transfer ended: once this returns no sender can write into its blocks."""

    @abstractmethod
    def close(self) -> None:
        """Withdraw the address, drop every connection and stop threads."""
