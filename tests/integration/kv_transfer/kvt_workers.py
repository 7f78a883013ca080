"""Instances for the multi-process kv_transfer tests: one process per instance.

Each child is spawned with `multiprocessing` (spawn context) and driven over a Pipe by
small command tuples. Every rank of an instance has its own role object, cache and
pairs; the pairs between instances are real Gloo groups or real shared memory.
Every wait here is bounded; a child whose parent disappears exits.
"""

from __future__ import annotations

import itertools
import logging
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import redis
import torch

from engine.block_pool import BlockPool
from engine.kv_cache import KVCache
from kv_transfer.base import (
    InstanceRef,
    LocalRank,
    Parallelism,
    RecvSpec,
    SendSpec,
    TransferStatus,
)
from kv_transfer.faults import Fault, FaultyConnector
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import RedisRendezvous
from kv_transfer.sender import KVSender, SenderConfig
from kv_transfer.shm import ShmConfig, ShmConnector, ShmEndpoint, ShmSegment
from kv_transfer.testing import fill, rank_layout, read, reference_kv, shard
from kv_transfer.torch_dist import TorchDistConfig, TorchDistConnector, TorchDistEndpoint
from kv_transfer.transport import Connector

# The cluster secret both sides seal and check HELLOs with, as a cluster's processes
# get it from their config.
CLUSTER_SECRET = b"pdserve tests: the kv_transfer cluster secret"


def kv_keys(redis_url: str, cluster: str) -> list[str]:
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0, decode_responses=True)
    try:
        return sorted(client.keys(f"pdserve:{cluster}:kv:*"))
    finally:
        client.close()


def own_segments() -> list[str]:
    return [p.name for p in Path("/dev/shm").glob(f"pdkv-{os.getpid()}-*")]


@dataclass
class Child:
    """The parent's handle on a spawned instance process."""

    proc: Any
    conn: Connection

    def send(self, *cmd: Any) -> None:
        self.conn.send(cmd)

    def reply(self, timeout: float = 60.0) -> Any:
        if not self.conn.poll(timeout):
            raise AssertionError(f"child {self.proc.pid} did not answer within {timeout}s")
        return self.conn.recv()

    def call(self, *cmd: Any, timeout: float = 60.0) -> Any:
        self.send(*cmd)
        return self.reply(timeout)


Spawn = Callable[..., Child]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
WAIT_S = 20.0  # no single step of a test may take longer


@dataclass(frozen=True)
class Setup:
    """Everything an instance process needs; plain values, so it crosses spawn."""

    name: str
    tp: int
    pp: int
    transport: str  # torch_dist | shm
    redis_url: str
    cluster: str
    num_layers: int = 4
    num_kv_heads: int = 4
    head_dim: int = 16
    block_size: int = 4
    num_blocks: int = 64
    dtype: str = "float32"
    op_timeout_s: float = 5.0
    faults: tuple[Fault, ...] = ()
    device: str = "cpu"  # cuda:N puts the caches on a GPU (torch_dist then uses NCCL)
    scramble: bool = True  # hand out blocks in scattered runs; False: consecutive ids
    zero_copy: bool | None = None  # torch_dist: dense slices from the cache; None: default
    max_span_bytes: int | None = None  # None: the links' own; 1: every layer alone
    spans: bool = False  # faulty links take spans of layers (else one layer per message)
    checksum: bool | None = None  # senders' per-slice checksums; None: the CPU default (on)

    @property
    def parallel(self) -> Parallelism:
        return Parallelism(self.tp, self.pp)

    @property
    def ref(self) -> InstanceRef:
        return InstanceRef(self.name, self.parallel)

    @property
    def geo(self) -> KVGeometry:
        return KVGeometry(self.num_layers, self.num_kv_heads)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def ranks(self) -> list[LocalRank]:
        p = self.parallel
        return [LocalRank(self.name, p, *p.coords(r)) for r in range(p.world_size)]

    def store(self) -> RedisRendezvous:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5.0)
        return RedisRendezvous(client, self.cluster)

    def layout_cache(self, me: LocalRank) -> KVCache:
        layout = rank_layout(
            self.geo, me, self.head_dim, self.block_size, self.num_blocks, self.torch_dtype
        )
        return KVCache(layout, self.device)

    def connector(self) -> Connector:
        cfg = TorchDistConfig(
            op_timeout_s=self.op_timeout_s,
            connect_timeout_s=5.0,
            zero_copy=self.zero_copy,
            secret=CLUSTER_SECRET,
        )
        inner: Connector = (
            TorchDistConnector(self.store(), cfg)
            if self.transport == "torch_dist"
            else ShmConnector(self.store(), ShmConfig(secret=CLUSTER_SECRET))
        )
        return FaultyConnector(inner, self.faults, spans=self.spans) if self.faults else inner


def _scrambled_pool(num_blocks: int, seed: str) -> BlockPool:
    """A pool whose free list hands out runs of 3 consecutive ids in random order."""
    pool = BlockPool(num_blocks)
    runs = [pool.allocate(min(3, pool.num_free)) for _ in range(-(-num_blocks // 3))]
    random.Random(seed).shuffle(runs)
    for run in runs:
        pool.release(run)
    return pool


def status_tuple(s: TransferStatus) -> tuple[str, str | None]:
    return s.state.value, s.reason


def _init_child() -> None:
    torch.set_num_threads(1)
    logging.basicConfig(
        level=logging.WARNING, format=f"[pid {os.getpid()}] %(name)s %(levelname)s %(message)s"
    )


def _recv(conn: Connection, timeout: float = 120.0) -> Any:
    if not conn.poll(timeout):
        raise TimeoutError("no command from the parent")
    return conn.recv()


@dataclass
class Prefill:
    """A prefill instance: a sender, a cache and a block pool per rank."""

    setup: Setup
    ranks: list[LocalRank] = field(init=False)
    caches: list[KVCache] = field(init=False)
    senders: list[KVSender] = field(init=False)
    pool: BlockPool = field(init=False)

    def __post_init__(self) -> None:
        s = self.setup
        self.ranks = s.ranks()
        self.caches = [s.layout_cache(me) for me in self.ranks]
        self.senders = [
            KVSender(
                me,
                cache,
                s.geo,
                s.connector(),
                SenderConfig(checksum=s.checksum, max_span_bytes=s.max_span_bytes),
            )
            for me, cache in zip(self.ranks, self.caches, strict=True)
        ]
        self.pool = _scrambled_pool(s.num_blocks, s.name) if s.scramble else BlockPool(s.num_blocks)

    def send(
        self,
        tid: str,
        dest: InstanceRef,
        num_blocks: int,
        seed: int,
        chunks: Sequence[int],
        timeout_s: float,
    ) -> dict[str, Any]:
        """Send one transfer from every rank, chunk by chunk, and wait for the senders."""
        s = self.setup
        ref = reference_kv(s.geo, s.head_dim, s.block_size, num_blocks, s.torch_dtype, seed)
        src = self.pool.allocate(num_blocks)
        for me, cache in zip(self.ranks, self.caches, strict=True):
            fill(cache, ref, s.geo, me, src)
        began = time.monotonic()
        for sender in self.senders:
            sender.open(SendSpec(tid, dest, 0, timeout_s))
        bounds = [0, *chunks, num_blocks]
        for lo, hi in itertools.pairwise(bounds):
            for me, sender in zip(self.ranks, self.senders, strict=True):
                for layer in s.geo.layers(me.parallel, me.pp_rank):
                    sender.send_layer(tid, layer, src[lo:hi], lo)
        for sender in self.senders:
            sender.finish(tid)
        # finish() has returned: the engine may reuse the blocks at once. Clobber them, so
        # that a transport still reading them would deliver zeros.
        index = torch.tensor(src, dtype=torch.long, device=s.device)
        for cache in self.caches:
            cache.tensor.index_fill_(2, index, 0)
        states = wait_terminal(self.senders, tid)
        self.pool.release(src[::-1])
        return {"states": [status_tuple(x) for x in states], "elapsed": time.monotonic() - began}

    def close(self) -> dict[str, Any]:
        active = [sender.num_active for sender in self.senders]
        for sender in self.senders:
            sender.close()
        return {"active": active, "free": self.pool.num_free}


def wait_terminal(
    roles: Sequence[KVSender | KVReceiver], tid: str, limit: float = WAIT_S
) -> list[TransferStatus]:
    deadline = time.monotonic() + limit
    while True:
        states = [role.poll(tid) for role in roles]
        if all(s.terminal for s in states) or time.monotonic() > deadline:
            return states
        time.sleep(0.001)


def prefill_main(conn: Connection, setup: Setup) -> None:
    """Child: a prefill instance that sends transfers on command."""
    _init_child()
    prefill = Prefill(setup)
    conn.send(("ready",))
    while True:
        cmd = _recv(conn)
        if cmd[0] == "send":
            _, tid, dest, num_blocks, seed, chunks, timeout_s = cmd
            conn.send(("sent", prefill.send(tid, dest, num_blocks, seed, chunks, timeout_s)))
        elif cmd[0] == "close":
            conn.send(("closed", prefill.close()))
            return


@dataclass
class Decode:
    """A decode instance: a receiver, a cache (in shm when needed) and a pool per rank."""

    setup: Setup
    ranks: list[LocalRank] = field(init=False)
    caches: list[KVCache] = field(init=False)
    receivers: list[KVReceiver] = field(init=False)
    endpoints: list[TorchDistEndpoint | ShmEndpoint] = field(init=False)
    segments: list[ShmSegment] = field(init=False)
    pool: BlockPool = field(init=False)
    blocks: dict[str, list[int]] = field(init=False)

    def __post_init__(self) -> None:
        s = self.setup
        self.ranks = s.ranks()
        self.caches, self.receivers, self.endpoints, self.segments = [], [], [], []
        self.blocks = {}
        store = s.store()
        for me in self.ranks:
            endpoint: TorchDistEndpoint | ShmEndpoint
            if s.transport == "shm":
                layout = rank_layout(
                    s.geo, me, s.head_dim, s.block_size, s.num_blocks, s.torch_dtype
                )
                segment = ShmSegment.create(layout)
                self.segments.append(segment)
                cache = KVCache(layout, storage=segment.cache_bytes)
                endpoint = ShmEndpoint(store, segment, s.geo, ShmConfig(secret=CLUSTER_SECRET))
            else:
                cache = s.layout_cache(me)
                cfg = TorchDistConfig(
                    op_timeout_s=s.op_timeout_s, connect_timeout_s=5.0, secret=CLUSTER_SECRET
                )
                endpoint = TorchDistEndpoint(store, cfg)
            self.caches.append(cache)
            self.endpoints.append(endpoint)
            self.receivers.append(KVReceiver(me, cache, s.geo, endpoint))
        self.pool = _scrambled_pool(s.num_blocks, s.name) if s.scramble else BlockPool(s.num_blocks)

    def expect(self, tid: str, source: InstanceRef, num_blocks: int, timeout_s: float) -> None:
        ids = self.pool.allocate(num_blocks)
        self.blocks[tid] = ids
        for receiver in self.receivers:
            receiver.expect(RecvSpec(tid, tuple(ids), source, 0, timeout_s))

    def wait(self, tid: str, limit: float = WAIT_S) -> list[TransferStatus]:
        """Every rank's state once all have ended it (or the limit passed)."""
        return wait_terminal(self.receivers, tid, limit)

    def free(self, tid: str) -> None:
        self.pool.release(self.blocks.pop(tid)[::-1])

    def landed(self, tid: str, num_blocks: int, seed: int) -> bool:
        """Whether every rank's blocks hold exactly its shard of the reference."""
        s = self.setup
        ref = reference_kv(s.geo, s.head_dim, s.block_size, num_blocks, s.torch_dtype, seed)
        ids = self.blocks[tid]
        return all(
            torch.equal(read(cache, ids), shard(ref, s.geo, me))
            for me, cache in zip(self.ranks, self.caches, strict=True)
        )

    def leaks(self) -> list[str]:
        problems = []
        if any(r.num_active for r in self.receivers):
            problems.append(f"active transfers {[r.num_active for r in self.receivers]}")
        if self.pool.num_free != self.setup.num_blocks:
            problems.append(f"{self.setup.num_blocks - self.pool.num_free} blocks not freed")
        for e in self.endpoints:
            if isinstance(e, ShmEndpoint) and e.num_free_slots != e.num_slots:
                problems.append("shm slots not free")
        return problems

    def close(self) -> None:
        for receiver in self.receivers:
            receiver.close()
        for segment in self.segments:
            segment.close()


def decode_main(conn: Connection, setup: Setup) -> None:
    """Child: a decode instance that registers transfers on command (and can be killed)."""
    _init_child()
    decode = Decode(setup)
    conn.send(("ready",))
    while True:
        cmd = _recv(conn)
        if cmd[0] == "expect":
            _, tid, source, num_blocks, timeout_s = cmd
            decode.expect(tid, source, num_blocks, timeout_s)
            conn.send(("expected",))
        elif cmd[0] == "wait":
            _, tid, num_blocks, seed = cmd
            states = decode.wait(tid)
            ok = decode.landed(tid, num_blocks, seed)
            if all(x.terminal for x in states):
                decode.free(tid)
            conn.send(("waited", [status_tuple(x) for x in states], ok))
        elif cmd[0] == "close":
            leaks = decode.leaks()
            decode.close()
            conn.send(("closed", leaks))
            return


# ---- engines: a real prefill forward pass feeding a real decode engine ----------------


@dataclass(frozen=True)
class EngineSetup:
    model_dir: str
    name: str
    transport: str
    redis_url: str
    cluster: str
    max_num_batched_tokens: int = 32  # small, so long prompts prefill in chunks

    def config(self) -> Any:
        from engine import EngineConfig

        return EngineConfig(
            model=self.model_dir,
            num_threads=1,
            kv_cache_bytes=1 << 20,
            max_model_len=256,
            max_num_batched_tokens=self.max_num_batched_tokens,
        )

    def store(self) -> RedisRendezvous:
        client = redis.Redis.from_url(self.redis_url, socket_timeout=5.0)
        return RedisRendezvous(client, self.cluster)


def prefill_engine_main(conn: Connection, setup: EngineSetup) -> None:
    """Child: a prefill engine whose forward pass streams KV through a SendHook, with
    the blocks it sends pinned until their transfer is over, as the prefill worker does."""
    from engine import LLMEngine, SamplingParams
    from engine.block_pins import BlockPins
    from kv_transfer.engine_hook import SendHook

    _init_child()
    cfg = setup.config()
    hook = SendHook(cfg.block_size)
    engine = LLMEngine(cfg, layer_hook=hook)
    mc = engine.model_config
    connector: Connector = (
        TorchDistConnector(setup.store())
        if setup.transport == "torch_dist"
        else ShmConnector(setup.store())
    )
    sender = KVSender(
        LocalRank(setup.name),
        engine.kv_cache,
        KVGeometry(mc.num_layers, mc.num_kv_heads),
        connector,
    )
    pins = BlockPins(engine.block_pool)
    hook.bind(sender, pins)
    conn.send(("ready",))
    while True:
        cmd = _recv(conn)
        if cmd[0] == "prefill":
            _, requests, dest, timeout_s = cmd
            for rid, tid, prompt in requests:
                hook.add(rid, SendSpec(tid, dest, 0, timeout_s))
                engine.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=1))
            first: dict[str, int] = {}
            deadline = time.monotonic() + WAIT_S
            while len(first) < len(requests) and time.monotonic() < deadline:
                for out in engine.step():
                    if out.finished:
                        first[out.request_id] = out.token_ids[0]
            states = {tid: status_tuple(wait_terminal([sender], tid)[0]) for _, tid, _ in requests}
            for _, tid, _ in requests:
                pins.release(tid)
            conn.send(("prefilled", first, states))
        elif cmd[0] == "close":
            pool = engine.block_pool
            leaks = {
                "active": sender.num_active,
                "hooked": hook.num_requests,
                "pinned": pins.num_pinned,
                "blocks_in_use": pool.num_blocks - pool.num_free,
                "unfinished": engine.has_unfinished_requests(),
            }
            sender.close()
            conn.send(("closed", leaks))
            return
