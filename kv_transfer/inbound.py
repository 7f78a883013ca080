"""A receiver rank's records: one per transfer it expects, with one stream per sender
rank, and the checks of each DATA header against the transfer's plan. The receiver
(receiver.py) owns every record and changes one only under its lock.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kv_transfer.base import (
    PENDING,
    FirstToken,
    RecvSpec,
    TransferRecord,
    TransferStatus,
    failed,
)
from kv_transfer.header import Header
from kv_transfer.mapping import Route
from kv_transfer.regions import BlockRegion, LayerSpan, region_of
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
    """One transfer on one receiver rank, from `expect` until its terminal status."""

    spec: RecvSpec
    streams: dict[int, Stream]  # by sender rank
    remaining: int  # (sender rank, layer) slices not complete
    deadline: float
    status: TransferStatus = PENDING
    ending: bool = False
    writing: int = 0  # payloads being received straight into the blocks
    peers: set[Peer] = field(default_factory=set)  # connections that announced data
    first: FirstToken | None = None  # brought by an END
    request_id: str = ""  # the request whose KV this is, for its log lines
    # For metrics: when the first payload landed, the payload bytes landed, and the
    # prompt block after the last one landed.
    first_landed: float | None = None
    landed_bytes: int = 0
    block_end: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    drained: threading.Condition = field(init=False)

    def __post_init__(self) -> None:
        self.drained = threading.Condition(self.lock)

    @classmethod
    def planned(
        cls, spec: RecvSpec, routes: Sequence[Route], layers: range, deadline: float
    ) -> Inbound:
        """The record of a transfer whose slices come along `routes` (those that end on
        this rank, which holds `layers`)."""
        n = len(layers)
        streams: dict[int, Stream] = {}
        for r in routes:
            stream = streams.setdefault(r.src, Stream([None] * n, [spec.first_block] * n, [0] * n))
            local = slice(r.layer_start - layers.start, r.layer_stop - layers.start)
            stream.heads[local] = [(r.head_start, r.num_heads)] * len(r.layers)
        slices = sum(stream.num_slices for stream in streams.values())
        return cls(spec, streams, slices, deadline)

    @property
    def total(self) -> int:
        return len(self.spec.block_ids)

    def missing_from(self, rank: int) -> int:
        stream = self.streams.get(rank)
        return 0 if stream is None else stream.incomplete(self.total)

    def from_source(self, peer: Peer) -> bool:
        """Whether `peer` is a rank of the instance and layout the transfer expects."""
        source = self.spec.source
        return (peer.id.instance, peer.parallel) == (source.name, source.parallel)

    def timeout_status(self) -> TransferStatus:
        missing = sum(stream.incomplete(self.total) for stream in self.streams.values())
        slices = sum(stream.num_slices for stream in self.streams.values())
        first = " and no first token" if self.spec.first_token and self.first is None else ""
        return failed(
            f"timed out after {self.spec.timeout_s:g}s with {missing} of "
            f"{slices} layer slices incomplete{first}"
        )

    def record(self, status: TransferStatus) -> TransferRecord:
        """The transfer's figures at its terminal `status`, for the receiver's sink."""
        blocks = self.block_end - self.spec.first_block
        return TransferRecord.ended("recv", status, self.landed_bytes, blocks, self.first_landed)

    def destination(
        self, cache: torch.Tensor, layer0: int, head0: int, peer: Peer, h: Header
    ) -> tuple[BlockRegion | LayerSpan, Stream, slice] | str:
        """The destination of a DATA message in `cache`, whose first layer and KV head
        are `layer0` and `head0` (its region, and the sender's stream and local layers),
        or why it does not belong here."""
        stream = self.streams.get(peer.id.rank)
        start = h.layer - layer0
        layers = slice(start, start + h.layer_count)
        heads = (h.head_start, h.head_count)
        if stream is None or start < 0 or stream.heads[layers].count(heads) != h.layer_count:
            return f"unexpected slice: layers {h.layers} heads {h.head_start}+{h.head_count}"
        cursor = stream.cursor[layers]
        if cursor.count(h.block_start) != len(cursor):
            i, expected = next((i, c) for i, c in enumerate(cursor) if c != h.block_start)
            return (
                f"layer {h.layer + i}: expected block {expected}, got {h.block_start} "
                "(lost or repeated message)"
            )
        first = h.block_start - self.spec.first_block
        if h.block_count < 1 or first + h.block_count > self.total:
            return f"blocks {h.block_start}+{h.block_count} outside the reserved blocks"
        head = h.head_start - head0
        ids = self.spec.block_ids[first : first + h.block_count]
        local = range(layers.start, layers.stop)
        region = region_of(cache, local, head, head + h.head_count, ids)
        if (h.dtype, h.shape, h.nbytes) != (region.dtype, region.shape, region.nbytes):
            return f"payload {h.dtype} {h.shape} does not match {region.dtype} {region.shape}"
        return region, stream, layers


@dataclass(eq=False)
class InboundTarget(Target):
    inbound: Inbound
    stream: Stream
    layers: slice  # the local layers the message covers
