"""A sender rank's records: one per transfer it sends, and the jobs its pump thread takes.

The engine thread creates an `Outbound` at open and queues a `SliceJob` per layer sent,
then a `FinishJob`; a failure queues an `AbortJob`. The sender (sender.py) owns every
record and changes an `Outbound` only under its lock; the pump reads the jobs in order.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from kv_transfer.base import PENDING, FirstToken, SendSpec, TransferStatus
from kv_transfer.mapping import Route
from kv_transfer.transport import Link


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
