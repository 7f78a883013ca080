"""Fault injection for any transport: wrap its Connector, and every link it opens misbehaves.

Faults hit DATA messages, counted across all links of the wrapped connector in the
order the sender sends them:

* DROP: the message silently never leaves (the link still reports success).
* DELAY: the message leaves `delay_s` late (the pump stalls, as on a slow wire).
* CORRUPT: the bytes that arrive differ from the ones checksummed: the link is handed
  a copy of the source with one byte inverted.
* KILL: the sender dies at this message. By default the process SIGKILLs itself, the
  realistic case for multi-process tests; pass `on_kill` to do something else (tests
  that stay in one process sever the link instead).

A fault applies to DATA messages `after ... after + times - 1` (`times=0`: all from
`after` on). Control messages pass untouched, except after a KILL. So that an index
names one layer's slice whatever the timing, a faulty link carries one layer per
message; `spans=True` keeps the inner link's layer spans (a DATA message may then carry
several layers, as many as were queued).
"""

from __future__ import annotations

import enum
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from kv_transfer.base import LocalRank, RankId, TransferError
from kv_transfer.header import Header, MessageKind
from kv_transfer.regions import BlockRegion, LayerSpan
from kv_transfer.transport import Completion, Connector, Link

logger = logging.getLogger(__name__)


class FaultKind(enum.Enum):
    DROP = "drop"
    DELAY = "delay"
    CORRUPT = "corrupt"
    KILL = "kill"


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    after: int = 0
    times: int = 1
    delay_s: float = 0.0

    def __post_init__(self) -> None:
        if self.after < 0 or self.times < 0 or self.delay_s < 0:
            raise ValueError(f"invalid fault {self}")

    def hits(self, index: int) -> bool:
        return index >= self.after and (self.times == 0 or index < self.after + self.times)


def _corrupted_copy(region: BlockRegion | LayerSpan) -> BlockRegion | LayerSpan:
    """A private copy of `region`'s bytes, with one byte inverted."""
    copy = region.private_copy()
    copy.flip_byte()
    return copy


def _kill_self(link: Link) -> None:
    logger.error("fault injection: killing process %d", os.getpid())
    os.kill(os.getpid(), signal.SIGKILL)


class FaultyConnector(Connector):
    """Wraps `inner` so that the links it opens suffer `faults`."""

    def __init__(
        self,
        inner: Connector,
        faults: Sequence[Fault],
        on_kill: Callable[[Link], None] = _kill_self,
        spans: bool = False,
    ) -> None:
        self._inner, self._faults, self._on_kill = inner, tuple(faults), on_kill
        self.spans = spans
        self._lock = threading.Lock()
        self._count = 0
        self.killed = False
        self.injected: list[tuple[int, FaultKind]] = []  # (DATA index, fault) so far

    def connect(self, me: LocalRank, peer: RankId) -> Link:
        if self.killed:
            raise TransferError("sender was killed")
        return _FaultyLink(self._inner.connect(me, peer), self)

    def close(self) -> None:
        self._inner.close()

    def _next_fault(self) -> Fault | None:
        with self._lock:
            index, self._count = self._count, self._count + 1
            fault = next((f for f in self._faults if f.hits(index)), None)
            if fault is not None:
                self.injected.append((index, fault.kind))
            return fault


class _FaultyLink(Link):
    def __init__(self, inner: Link, owner: FaultyConnector) -> None:
        self._inner, self._owner = inner, owner
        self.peer = inner.peer
        self.max_layers = inner.max_layers if owner.spans else 1
        self.max_span_bytes = inner.max_span_bytes

    @property
    def broken(self) -> bool:
        return self._owner.killed or self._inner.broken

    def send(
        self, header: Header, region: BlockRegion | LayerSpan | None, checksum: bool = False
    ) -> Completion:
        if self._owner.killed:
            raise TransferError("sender was killed")
        if header.kind is not MessageKind.DATA or region is None:
            return self._inner.send(header, region, checksum)
        fault = self._owner._next_fault()
        if fault is None:
            return self._inner.send(header, region, checksum)
        logger.info(
            "fault injection: %s on %s layer %d", fault.kind.value, header.transfer_id, header.layer
        )
        if fault.kind is FaultKind.DROP:
            return Completion.resolved()
        if fault.kind is FaultKind.DELAY:
            time.sleep(fault.delay_s)
            return self._inner.send(header, region, checksum)
        if fault.kind is FaultKind.CORRUPT:
            # The checksum covers the true bytes; the link then moves damaged ones.
            if checksum:
                header = header.with_checksum(region.checksum())
            return self._inner.send(header, _corrupted_copy(region))
        self._owner.killed = True
        self._owner._on_kill(self._inner)
        raise TransferError("sender was killed")

    def close(self) -> None:
        self._inner.close()
