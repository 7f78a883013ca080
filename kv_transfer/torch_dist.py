"""The torch.distributed transport: point-to-point send/recv over per-pair process groups.

Each receiver rank runs a TCPStore server and a control listener, both on free ports
of the configured host and listening there only, and publishes them under
`torch_dist:<instance>:<rank>` in the rendezvous store with a TTL. There is no global
world and no init_process_group.

A pair (sender rank, receiver rank) is created lazily on its first slice and reused:

    sender                                     receiver
    control connect, HELLO(token)      ->      reader thread opens a session:
    TCPStore client to the receiver            ProcessGroupGloo/NCCL(rank 1, size 2)
    ProcessGroupGloo/NCCL(rank 0, size 2)      over PrefixStore("kvpair/<token>")

Gloo for CPU tensors, NCCL for CUDA ones; both with a short timeout. Per DATA message
(one layer, or a span of several that the sender coalesces when they queue up) the
sender gathers the slice into a staging tensor (summing it as it copies, when the
message carries a checksum) and writes the header on the control socket; a poster
thread then posts asynchronous sends, and a waiter thread waits on them in order and
resolves their completions. A gathered message with a checksum goes whole: the
receiver takes it into staging and sums it as it scatters it. One without goes in
parts, the K and V halves of each layer in turn (transport.in_parts). With
`zero_copy` (the default over Gloo), a slice whose blocks are one run with all heads
goes in parts straight from the cache, summed there first when checksummed, with no
gather. The receiver takes parts straight into their destination blocks when those
are one run with all heads (verifying a checksum there once they are in), else into
staging, scattered when it lands. Any error or timeout tears the pair down on that
side (control socket closed, group dropped or aborted); the other side's pending
operations then fail, and the next transfer builds a new pair.

This module holds the config and the two plug-ins (`TorchDistConnector`,
`TorchDistEndpoint`); the pair's group is in torch_dist_pair.py, its sender end in
torch_dist_link.py and its receiver end in torch_dist_session.py.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
from torch._C._distributed_c10d import TCPStore

from engine.parallel.tcp_store import serve_tcp_store
from kv_transfer.auth import HelloAuth
from kv_transfer.base import LocalRank, RankId, TransferError
from kv_transfer.control import ControlClient, ControlServer, listen
from kv_transfer.guard import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS, server_guard
from kv_transfer.header import TOKEN_BYTES, Hello
from kv_transfer.rendezvous import (
    Lease,
    RendezvousStore,
    encode_record,
    rank_key,
    resolve,
    split_hostport,
)
from kv_transfer.staging import StagingPool
from kv_transfer.torch_dist_link import SendLink
from kv_transfer.torch_dist_pair import backend_for, new_pair_group
from kv_transfer.torch_dist_session import ReceiveStats, RecvSession
from kv_transfer.transport import Connector, Endpoint, Inbox, Link, Peer, TransportKind

logger = logging.getLogger(__name__)

TRANSPORT = TransportKind.TORCH_DIST
_RECORD = {"control": str, "store": str, "backend": str}


@dataclass(frozen=True)
class TorchDistConfig:
    host: str = "127.0.0.1"  # interface to bind and advertise (loopback unless set)
    backend: str | None = None  # "gloo" or "nccl"; None: by the cache's device
    connect_timeout_s: float = 10.0  # connect, HELLO and group rendezvous
    op_timeout_s: float = 10.0  # one send or recv; then the pair is torn down
    ttl_s: float = 10.0  # rendezvous record lifetime without refresh
    # Send slices whose blocks are one run with all heads straight from the cache, with
    # no gather copy (a checksum is then summed in place: a read, and no write), so the
    # blocks are read until the sends complete: a prefill engine pins them
    # (kv_transfer.engine_hook), or its sender's finish(wait=True) waits for the sends.
    # None: on for Gloo pairs, where the gather competes with the loopback copies for
    # the cores; off for NCCL ones, where a gather on the device is cheap and one send
    # per message beats one per layer and K/V.
    zero_copy: bool | None = None
    # The cluster secret: HELLOs are sealed with it (kv_transfer.auth). None: unsealed,
    # which the receiver logs as a warning; both ends must agree.
    secret: bytes | None = field(default=None, repr=False)
    max_connections: int = DEFAULT_MAX_CONNECTIONS  # open control connections per rank
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S  # after HELLO; senders reconnect at half
    max_staging_bytes: int = 1 << 30  # receiver staging held by messages in flight

    def __post_init__(self) -> None:
        if self.backend not in (None, "gloo", "nccl"):
            raise ValueError(f"backend must be 'gloo' or 'nccl', got {self.backend!r}")
        if min(self.connect_timeout_s, self.op_timeout_s, self.ttl_s, self.idle_timeout_s) <= 0:
            raise ValueError(f"timeouts must be > 0: {self}")
        if self.max_connections < 1 or self.max_staging_bytes < 1:
            raise ValueError(f"max_connections and max_staging_bytes must be >= 1: {self}")


class TorchDistConnector(Connector):
    """Opens pairs to receiver ranks found in the rendezvous store."""

    def __init__(self, store: RendezvousStore, config: TorchDistConfig = TorchDistConfig()) -> None:
        self._store, self._cfg = store, config
        self._auth = HelloAuth(config.secret) if config.secret is not None else None

    def connect(self, me: LocalRank, peer: RankId) -> Link:
        rec = resolve(self._store, TRANSPORT, peer, _RECORD)
        backend = rec["backend"]
        if self._cfg.backend is not None and backend != self._cfg.backend:
            raise TransferError(f"{peer} uses {backend}, this sender {self._cfg.backend}")
        token = os.urandom(TOKEN_BYTES)
        hello = Hello(me.instance, me.rank, me.parallel.tp, me.parallel.pp, token)
        control = ControlClient(
            rec["control"],
            hello,
            self._cfg.connect_timeout_s,
            self._auth,
            max_idle_s=self._cfg.idle_timeout_s / 2,
        )
        try:
            host, port = split_hostport(rec["store"])
            store = TCPStore(
                host,
                port,
                None,
                False,
                timeout=timedelta(seconds=self._cfg.connect_timeout_s),
                wait_for_workers=False,
            )
            group = new_pair_group(store, token, 0, backend, self._cfg.host, self._cfg.op_timeout_s)
        except Exception as e:
            control.close()
            raise TransferError(f"cannot build the pair group with {peer}: {e}") from e
        logger.info("%s -> %s: %s pair ready", me.id, peer, backend)
        zero_copy = backend == "gloo" if self._cfg.zero_copy is None else self._cfg.zero_copy
        return SendLink(peer, control, store, group, backend, self._cfg.op_timeout_s, zero_copy)


class TorchDistEndpoint(Endpoint):
    """A receiver rank's TCPStore and control listener, published with a TTL."""

    def __init__(self, store: RendezvousStore, config: TorchDistConfig = TorchDistConfig()) -> None:
        self._store, self._cfg = store, config
        self._server: ControlServer | None = None
        self._lease: Lease | None = None
        self._tcp_store: TCPStore | None = None
        self.stats = ReceiveStats()

    def start(self, me: LocalRank, cache: torch.Tensor, inbox: Inbox) -> None:
        backend = self._cfg.backend or backend_for(cache.device)
        if backend != backend_for(cache.device):
            raise ValueError(f"backend {backend} cannot move {cache.device.type} tensors")
        host = self._cfg.host
        # torch's own server would listen on every interface: bind `host` only
        self._tcp_store = serve_tcp_store(host, self._cfg.connect_timeout_s)
        tcp_store = self._tcp_store
        device, timeout = cache.device, self._cfg.op_timeout_s
        pool = StagingPool(max_in_use=self._cfg.max_staging_bytes, wait_s=timeout)

        def open_session(peer: Peer) -> RecvSession:
            try:
                group = new_pair_group(tcp_store, peer.token, 1, backend, host, timeout)
            except Exception as e:
                raise TransferError(f"pair group with {peer.id} failed: {e}") from e
            logger.info("%s <- %s: %s pair ready", me.id, peer.id, backend)
            return RecvSession(group, backend, device, inbox, timeout, pool, self.stats)

        listener, address = listen(f"tcp://{host}:0")
        self._server = ControlServer(
            listener,
            inbox,
            open_session,
            self._cfg.connect_timeout_s,
            str(me.id),
            pipelined=True,
            guard=server_guard(
                self._cfg.secret,
                address,
                max_connections=self._cfg.max_connections,
                idle_timeout_s=self._cfg.idle_timeout_s,
            ),
        )
        record = encode_record(control=address, store=f"{host}:{tcp_store.port}", backend=backend)
        self._lease = Lease(self._store, rank_key(TRANSPORT, me.id), record, self._cfg.ttl_s)

    @property
    def num_connections(self) -> int:
        return self._server.num_connections if self._server else 0

    def close(self) -> None:
        if self._lease is not None:
            self._lease.close()
        if self._server is not None:
            self._server.close(timeout_s=self._cfg.op_timeout_s + 1.0)
        self._tcp_store = None
