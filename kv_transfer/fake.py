"""An in-process transport for unit tests: no sockets, no threads, deterministic.

A `FakeFabric` stands in for the network. Receivers' endpoints register on it by rank
id; a sender's link looks the endpoint up and delivers each message synchronously on
the sender's pump thread, through the same staging validation as the real transports.
Closing a link or an endpoint severs the pair the way a dead peer would. Both modes
take several layers per message. With `in_place=True` it behaves like shm instead: a
link writes each slice straight into the destination blocks and sends only the header.
"""

from __future__ import annotations

import os
import threading

import torch

from kv_transfer.base import LocalRank, RankId, TransferError
from kv_transfer.header import TOKEN_BYTES, Header
from kv_transfer.region_copies import copy_into
from kv_transfer.regions import BlockRegion, LayerSpan
from kv_transfer.transport import Completion, Connector, Endpoint, Inbox, Link, Peer, staging_for
from kv_transfer.word_sums import checksum as payload_checksum


class FakeFabric:
    """The shared in-process 'network' of one test."""

    def __init__(self, in_place: bool = False) -> None:
        self._lock = threading.Lock()
        self._endpoints: dict[RankId, FakeEndpoint] = {}
        self.in_place = in_place

    def endpoint(self) -> FakeEndpoint:
        return FakeEndpoint(self)

    def connector(self) -> FakeConnector:
        return FakeConnector(self)

    def _register(self, rank: RankId, endpoint: FakeEndpoint) -> None:
        with self._lock:
            if rank in self._endpoints:
                raise ValueError(f"{rank} is already registered")
            self._endpoints[rank] = endpoint

    def _unregister(self, rank: RankId) -> None:
        with self._lock:
            self._endpoints.pop(rank, None)

    def _lookup(self, rank: RankId) -> FakeEndpoint:
        with self._lock:
            endpoint = self._endpoints.get(rank)
        if endpoint is None:
            raise TransferError(f"no receiver {rank} on the fabric")
        return endpoint


class FakeEndpoint(Endpoint):
    def __init__(self, fabric: FakeFabric) -> None:
        self._fabric = fabric
        self.in_place = fabric.in_place
        self._lock = threading.Lock()
        self._links: set[FakeLink] = set()
        self._me: RankId | None = None
        self.inbox: Inbox | None = None
        self.device = torch.device("cpu")
        self.received_bytes = 0  # DATA payload bytes delivered here
        self.received_messages = 0  # DATA messages delivered here

    def start(self, me: LocalRank, cache: torch.Tensor, inbox: Inbox) -> None:
        self._me, self.inbox, self.device = me.id, inbox, cache.device
        self._fabric._register(me.id, self)

    def _attach(self, link: FakeLink) -> None:
        with self._lock:
            self._links.add(link)

    def _detach(self, link: FakeLink) -> None:
        with self._lock:
            self._links.discard(link)

    @property
    def num_connections(self) -> int:
        with self._lock:
            return len(self._links)

    def close(self) -> None:
        if self._me is not None:
            self._fabric._unregister(self._me)
        with self._lock:
            links, self._links = list(self._links), set()
        for link in links:
            link.sever()


class FakeLink(Link):
    max_layers = 1 << 16

    def __init__(self, me: LocalRank, peer: RankId, endpoint: FakeEndpoint) -> None:
        self.peer = peer
        self._endpoint = endpoint
        self._from = Peer(me.id, me.parallel, os.urandom(TOKEN_BYTES))
        self._lock = threading.Lock()
        self._seq = 0
        self._broken = False
        endpoint._attach(self)

    @property
    def broken(self) -> bool:
        return self._broken

    def send(
        self, header: Header, region: BlockRegion | LayerSpan | None, checksum: bool = False
    ) -> Completion:
        inbox = self._endpoint.inbox
        if self._broken or inbox is None:
            raise TransferError(f"link to {self.peer} is closed")
        with self._lock:
            header, self._seq = header.with_seq(self._seq), self._seq + 1
        target, payload = None, None
        if region is not None and self._endpoint.in_place:
            if checksum:
                header = header.with_checksum(region.checksum())
            target = inbox.prepare(self._from, header, direct_ok=False)
            if target is not None:
                copy_into(target.region, region)
                self._endpoint.received_bytes += header.nbytes
                self._endpoint.received_messages += 1
        elif region is not None:
            wire = region.gather()  # what would travel
            if checksum:
                header = header.with_checksum(payload_checksum(wire))
            target = inbox.prepare(self._from, header, direct_ok=False)
            if target is not None:
                payload = staging_for(
                    header,
                    inbox.max_payload_bytes,
                    inbox.max_payload_layers,
                    self._endpoint.device,
                )
                payload.copy_(wire)
                self._endpoint.received_bytes += header.nbytes
                self._endpoint.received_messages += 1
        inbox.land(self._from, header, target, payload)
        return Completion.resolved()

    def sever(self) -> None:
        """The pair vanishes as if the other side died."""
        if self._broken:
            return
        self._broken = True
        if self._endpoint.inbox is not None:
            self._endpoint.inbox.on_peer_lost(self._from, "link closed")

    def close(self) -> None:
        self._endpoint._detach(self)
        self.sever()


class FakeConnector(Connector):
    def __init__(self, fabric: FakeFabric) -> None:
        self._fabric = fabric

    def connect(self, me: LocalRank, peer: RankId) -> Link:
        return FakeLink(me, peer, self._fabric._lookup(peer))
