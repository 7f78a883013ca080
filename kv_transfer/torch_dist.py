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
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, Store, TCPStore

from engine.parallel.tcp_store import serve_tcp_store
from kv_transfer.auth import HelloAuth
from kv_transfer.base import LocalRank, RankId, TransferError
from kv_transfer.control import ControlClient, ControlServer, Finish, listen
from kv_transfer.guard import DEFAULT_IDLE_TIMEOUT_S, DEFAULT_MAX_CONNECTIONS, server_guard
from kv_transfer.header import TOKEN_BYTES, Header, Hello
from kv_transfer.regions import BlockRegion, LayerSpan, gather_checksummed
from kv_transfer.rendezvous import (
    Lease,
    RendezvousStore,
    encode_record,
    rank_key,
    resolve,
    split_hostport,
)
from kv_transfer.staging import StagingPool
from kv_transfer.transport import (
    Completion,
    Connector,
    Endpoint,
    Inbox,
    Link,
    Peer,
    Target,
    TransportKind,
    in_parts,
    message_parts,
    region_parts,
    splits,
    staging_for,
)

logger = logging.getLogger(__name__)

TRANSPORT = TransportKind.TORCH_DIST
_RECORD = {"control": str, "store": str, "backend": str}
_POLL_S = 1e-4  # NCCL completion polling


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


def _backend_for(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def new_pair_group(
    store: Store, token: bytes, rank: int, backend: str, host: str, timeout_s: float
) -> Any:
    """A 2-rank process group of its own, without any global world."""
    prefixed = PrefixStore(f"kvpair/{token.hex()}", store)
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        opts: Any = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = timeout
        opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
        return ProcessGroupGloo(prefixed, rank, 2, opts)
    nccl = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None:
        raise TransferError("this torch build has no NCCL")
    opts = nccl.Options()
    opts._timeout = timeout
    return nccl(prefixed, rank, 2, opts)


def _wait(work: Any, backend: str, timeout_s: float) -> None:
    """Block until `work` completes; raise on error or after `timeout_s`."""
    if backend == "gloo":
        work.wait()  # bounded by the group's timeout, which then closes the pair
        return
    deadline = time.monotonic() + timeout_s
    while not work.is_completed():
        if time.monotonic() > deadline:
            raise TransferError(f"NCCL operation timed out after {timeout_s:g}s")
        time.sleep(_POLL_S)
    work.wait()  # raises if it failed


def _abort(group: Any) -> None:
    abort = getattr(group, "abort", None)
    if abort is not None:
        try:
            abort()
        except Exception as e:  # best effort: the group is being dropped anyway
            logger.debug("abort failed: %s", e)


class _Link(Link):
    def __init__(
        self,
        peer: RankId,
        control: ControlClient,
        store: Store,
        group: Any,
        backend: str,
        op_timeout_s: float,
        zero_copy: bool,
    ) -> None:
        self.peer = peer
        self._control, self._store, self._group = control, store, group
        self._backend, self._timeout, self._zero_copy = backend, op_timeout_s, zero_copy
        self.max_layers = 1 << 16  # a span goes as one message of per-layer parts
        self._lock = threading.Lock()
        self._seq = 0
        self._broken = False
        self._pool = StagingPool()
        self._works: queue.SimpleQueue[tuple[list[Any], torch.Tensor | None, Completion] | None] = (
            queue.SimpleQueue()
        )
        self._posts: queue.SimpleQueue[
            tuple[tuple[torch.Tensor, ...], torch.Tensor | None, Completion] | None
        ] = queue.SimpleQueue()
        self._waiter = threading.Thread(target=self._wait_loop, name="kv-send-wait", daemon=True)
        self._waiter.start()
        self._poster = threading.Thread(target=self._post_loop, name="kv-send-post", daemon=True)
        self._poster.start()

    @property
    def broken(self) -> bool:
        return self._broken or self._control.stale

    def send(
        self, header: Header, region: BlockRegion | LayerSpan | None, checksum: bool = False
    ) -> Completion:
        with self._lock:
            if self._broken:
                raise TransferError(f"pair to {self.peer} is closed")
            header, self._seq = header.with_seq(self._seq), self._seq + 1
            if region is None:
                self._control.send(header.pack())
                return Completion.resolved()
            staging: torch.Tensor | None = None
            if self._zero_copy and region.dense and splits(region):
                # each layer's K and V are contiguous in the cache: send them as they lie,
                # summed in place first when checksummed (a read, and no gather write)
                if checksum:
                    header = header.with_checksum(region.checksum())
                header, parts = header.in_parts(True), region_parts(region)
            else:
                staging = self._pool.take(region.shape, region.dtype, region.cache.device)
                if checksum:  # gathered and summed in one pass
                    header = header.with_checksum(gather_checksummed(region, staging))
                else:
                    region.gather(out=staging)
                split = in_parts(region, checksum)
                header, parts = header.in_parts(split), message_parts(staging, split)
            self._control.send(header.pack())
            done = Completion(holds_source=staging is None)
            self._posts.put((parts, staging, done))
        return done

    def _post_loop(self) -> None:
        """Post each message's sends, in order. A send call can block while the pair's
        own thread writes an earlier message; here that never delays reading out (and
        checksumming) the next one."""
        while True:
            item = self._posts.get()
            if item is None:
                self._works.put(None)
                return
            parts, staging, done = item
            group = self._group
            if self._broken or group is None:
                done.resolve(f"pair to {self.peer} closed")
                continue
            try:
                works = [group.send([part], 1, tag) for tag, part in enumerate(parts)]
            except Exception as e:
                self._break()
                done.resolve(f"send to {self.peer}: {e}")
                continue
            self._works.put((works, staging, done))

    def _wait_loop(self) -> None:
        while True:
            item = self._works.get()
            if item is None:
                return
            works, staging, done = item
            if self._broken:
                done.resolve(f"pair to {self.peer} closed")
                continue
            try:
                for work in works:
                    _wait(work, self._backend, self._timeout)
            except Exception as e:
                self._break()
                done.resolve(f"send to {self.peer}: {e}")
                continue
            if staging is not None:
                self._pool.give(staging)
            done.resolve()

    def _break(self) -> None:
        with self._lock:
            if self._broken:
                return
            self._broken = True
        self._control.close()
        if self._backend == "nccl":
            _abort(self._group)

    def close(self) -> None:
        """Tear down without waiting (callers include `poll`): the poster fails what is
        still queued, and the waiter thread ends by itself once the group's own timeout
        has failed whatever is still pending."""
        self._break()
        self._posts.put(None)
        self._group = None  # the sockets close once pending works are gone


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
        return _Link(peer, control, store, group, backend, self._cfg.op_timeout_s, zero_copy)


Landing = Literal["direct", "staged", "drained"]


class ReceiveStats:
    """How DATA payloads arrived: straight into their blocks, through staging, or
    drained (received with nowhere to land: a failed or revoked transfer's messages
    still on the wire); and how many of them carried a span of several layers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.direct = 0
        self.staged = 0
        self.drained = 0
        self.spans = 0

    def count(self, landing: Landing, span: bool) -> None:
        with self._lock:
            if landing == "direct":
                self.direct += 1
            elif landing == "staged":
                self.staged += 1
            else:
                self.drained += 1
            self.spans += span


class _Session:
    direct_ok = True

    def __init__(
        self,
        group: Any,
        backend: str,
        device: torch.device,
        inbox: Inbox,
        timeout_s: float,
        pool: StagingPool,
        stats: ReceiveStats,
    ) -> None:
        self._group, self._backend, self._device = group, backend, device
        self._inbox, self._timeout, self._pool = inbox, timeout_s, pool
        self._stats = stats

    def start(self, header: Header, target: Target | None) -> Finish:
        if target is not None and target.direct:
            works = self._post(target.views())
            self._stats.count("direct", span=header.layer_count > 1)

            def finish_direct() -> None:
                self._wait_all(works)

            return finish_direct
        landing: Landing = "drained" if target is None else "staged"
        self._stats.count(landing, span=header.layer_count > 1)
        staging = staging_for(
            header,
            self._inbox.max_payload_bytes,
            self._inbox.max_payload_layers,
            self._device,
            self._pool,
        )
        try:
            works = self._post(message_parts(staging, header.parts))
        except BaseException:
            self._pool.forget(staging)
            raise

        def finish_staged() -> torch.Tensor | None:
            try:
                self._wait_all(works)
            except BaseException:
                self._pool.forget(staging)
                raise
            if target is None:  # nowhere to land: the bytes only had to leave the pair
                self._pool.give(staging)
                return None
            return staging

        return finish_staged

    def _post(self, parts: tuple[torch.Tensor, ...]) -> list[Any]:
        try:
            return [self._group.recv([part], 0, tag) for tag, part in enumerate(parts)]
        except Exception as e:
            raise TransferError(f"recv failed: {e}") from e

    def _wait_all(self, works: list[Any]) -> None:
        try:
            for work in works:
                _wait(work, self._backend, self._timeout)
        except Exception as e:
            raise TransferError(f"recv failed: {e}") from e

    def done(self, payload: torch.Tensor) -> None:
        self._pool.give(payload)

    def close(self) -> None:
        if self._backend == "nccl":
            _abort(self._group)
        self._group = None


class TorchDistEndpoint(Endpoint):
    """A receiver rank's TCPStore and control listener, published with a TTL."""

    def __init__(self, store: RendezvousStore, config: TorchDistConfig = TorchDistConfig()) -> None:
        self._store, self._cfg = store, config
        self._server: ControlServer | None = None
        self._lease: Lease | None = None
        self._tcp_store: TCPStore | None = None
        self.stats = ReceiveStats()

    def start(self, me: LocalRank, cache: torch.Tensor, inbox: Inbox) -> None:
        backend = self._cfg.backend or _backend_for(cache.device)
        if backend != _backend_for(cache.device):
            raise ValueError(f"backend {backend} cannot move {cache.device.type} tensors")
        host = self._cfg.host
        # torch's own server would listen on every interface: bind `host` only
        self._tcp_store = serve_tcp_store(host, self._cfg.connect_timeout_s)
        tcp_store = self._tcp_store
        device, timeout = cache.device, self._cfg.op_timeout_s
        pool = StagingPool(max_in_use=self._cfg.max_staging_bytes, wait_s=timeout)

        def open_session(peer: Peer) -> _Session:
            try:
                group = new_pair_group(tcp_store, peer.token, 1, backend, host, timeout)
            except Exception as e:
                raise TransferError(f"pair group with {peer.id} failed: {e}") from e
            logger.info("%s <- %s: %s pair ready", me.id, peer.id, backend)
            return _Session(group, backend, device, inbox, timeout, pool, self.stats)

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
