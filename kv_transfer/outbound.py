"""A sender rank's records: one per transfer it sends, and the jobs its pump thread takes.

The engine thread creates an `Outbound` at open and queues a `SliceJob` per layer sent,
then a `FinishJob`; a failure queues an `AbortJob`. `Outbounds` holds every record and
the lock under which the sender (sender.py) and its pump (send_pump.py) change them;
the pump reads the jobs in order.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from kv_transfer.base import (
    PENDING,
    EndSink,
    FirstToken,
    RecordSink,
    SendSpec,
    TransferRecord,
    TransferState,
    TransferStatus,
)
from kv_transfer.mapping import Route
from kv_transfer.transport import Link

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class Outbound:
    """One transfer on one sender rank, from open until its terminal status."""

    spec: SendSpec
    by_layer: dict[int, list[Route]]  # where each layer goes; one list per route shape
    deadline: float
    status: TransferStatus = PENDING
    inflight: int = 0
    finishing: bool = False
    ended: bool = False
    links: set[Link] = field(default_factory=set)
    reading: int = 0  # sends still reading the source blocks (zero-copy links)
    finish_pumped: bool = False  # the pump has processed finish()
    released: threading.Event = field(default_factory=threading.Event)  # sources unread
    registered: set[int] = field(default_factory=set)  # receiver ranks seen registered
    request_id: str = ""  # the request whose KV this is, for its log lines
    # For metrics: when the first data message went, its payload bytes handed over,
    # and the prompt block after the last one sent.
    first_sent: float | None = None
    sent_bytes: int = 0
    block_end: int = 0


@dataclass(slots=True)  # one per layer sent: a frozen dataclass costs 4x to build
class SliceJob:
    """Send one layer of the transfer over `block_ids` (from prompt block `first_block`)
    once `ready` (CUDA sources) has passed."""

    out: Outbound
    layer: int
    block_ids: tuple[int, ...]
    first_block: int
    ready: torch.cuda.Event | None
    queued_ns: int = 0  # when the engine thread queued it, for tracing (0: untraced)


@dataclass(frozen=True)
class FinishJob:
    """Send END to every receiver rank the transfer's routes reach, with the prompt's
    first token when this rank sampled it."""

    out: Outbound
    first: FirstToken | None = None


@dataclass(frozen=True)
class AbortJob:
    """Tell the receivers that the transfer failed (best effort)."""

    out: Outbound


Job = SliceJob | FinishJob | AbortJob | None  # None stops the pump


class Outbounds:
    """Every record of one sender rank, and the bytes its sends hold in flight, under
    one lock: the engine thread (open, finish, poll), the pump thread and the
    transport's completion callbacks all change them. Methods ending in `_locked` are
    called with `lock` held."""

    def __init__(
        self,
        history: int,
        on_record: RecordSink | None = None,
        on_end: EndSink | None = None,
    ) -> None:
        """`on_record` gets each transfer's figures as it becomes terminal, and `on_end`
        its id and terminal status (both under the lock: they must not block)."""
        self.lock = threading.Lock()
        self._on_record = on_record
        self._on_end = on_end
        self.room = threading.Condition(self.lock)  # notified as bytes in flight drop
        self.active: dict[str, Outbound] = {}
        self.unreleased: set[str] = set()  # transfers whose sources a send may still read
        self.history: OrderedDict[str, TransferStatus] = OrderedDict()
        self.inflight_bytes = 0
        self.current: Outbound | None = None  # the transfer the pump is sending
        self.closed = False
        self._max_history = history

    def get_locked(self, transfer_id: str) -> Outbound | None:
        """The active transfer, None if terminal; KeyError if never opened."""
        out = self.active.get(transfer_id)
        if out is None and transfer_id not in self.history:
            raise KeyError(f"unknown transfer {transfer_id!r}")
        return out

    def terminate_locked(self, out: Outbound, status: TransferStatus) -> bool:
        """Make `out` terminal with `status`; False if it already was."""
        if out.status.terminal:
            return False
        out.status = status = status.ended_now()
        self.maybe_release_locked(out)
        self.active.pop(out.spec.transfer_id, None)
        self.history[out.spec.transfer_id] = status
        while len(self.history) > self._max_history:
            self.history.popitem(last=False)
        self.room.notify_all()
        if self._on_record is not None:
            self._report(out, status)
        if self._on_end is not None:
            try:
                self._on_end(out.spec.transfer_id, status)
            except Exception:
                logger.exception("transfer %s: on_end failed", out.spec.transfer_id)
        return True

    def _report(self, out: Outbound, status: TransferStatus) -> None:
        assert self._on_record is not None
        blocks = out.block_end - out.spec.first_block
        record = TransferRecord.ended("send", status, out.sent_bytes, blocks, out.first_sent)
        try:
            self._on_record(record)
        except Exception:
            logger.exception("transfer %s: on_record failed", out.spec.transfer_id)

    def maybe_release_locked(self, out: Outbound) -> None:
        """Signal finish() once nothing reads the transfer's source blocks any more."""
        over = out.finish_pumped or out.status.terminal
        if over and out.reading == 0 and self.current is not out:
            out.released.set()
            self.unreleased.discard(out.spec.transfer_id)

    def maybe_done_locked(self, out: Outbound) -> None:
        """DONE once END went out and every send completed."""
        if out.ended and out.inflight == 0 and not out.status.terminal:
            self.terminate_locked(out, TransferStatus(TransferState.DONE))

    def late(self, now: float) -> list[Outbound]:
        with self.lock:
            return [out for out in self.active.values() if now > out.deadline]
