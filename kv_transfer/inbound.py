"""A receiver rank's records: one per transfer it expects, with one stream per sender
rank. The receiver (receiver.py) owns every record and changes one only under its lock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from kv_transfer.base import PENDING, FirstToken, RecvSpec, TransferStatus
from kv_transfer.transport import Peer, Target


@dataclass(eq=False)
class Stream:
    """What one sender rank sends this rank, per layer of this rank (local index): the
    heads, or None where it sends nothing; the next prompt block it will announce; and
    the blocks landed. Lists, so that a message over many layers is checked and counted
    with a few list operations rather than a Python loop over its layers."""

    heads: list[tuple[int, int] | None]  # (first head, head count)
    cursor: list[int]
    landed: list[int]

    @property
    def num_slices(self) -> int:
        return len(self.heads) - self.heads.count(None)

    def incomplete(self, total: int) -> int:
        return sum(
            1 for h, n in zip(self.heads, self.landed, strict=True) if h is not None and n < total
        )


@dataclass(eq=False)
class Inbound:
    spec: RecvSpec
    streams: dict[int, Stream]  # by sender rank
    remaining: int  # (sender rank, layer) slices not complete
    deadline: float
    status: TransferStatus = PENDING
    ending: bool = False
    writing: int = 0  # payloads being received straight into the blocks
    peers: set[Peer] = field(default_factory=set)  # connections that announced data
    first: FirstToken | None = None  # brought by an END
    # For metrics: when the first payload landed, the payload bytes landed, and the
    # prompt block after the last one landed.
    first_landed: float | None = None
    landed_bytes: int = 0
    block_end: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    drained: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.drained = threading.Condition(self.lock)

    @property
    def total(self) -> int:
        return len(self.spec.block_ids)

    def missing_from(self, rank: int) -> int:
        stream = self.streams.get(rank)
        return 0 if stream is None else stream.incomplete(self.total)


@dataclass(eq=False)
class InboundTarget(Target):
    inbound: Inbound
    stream: Stream
    layers: slice  # the local layers the message covers
