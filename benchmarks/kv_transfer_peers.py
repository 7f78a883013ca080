"""The two processes of the KV-transfer benchmark, and its baselines.

A child process is the prefill side: `peer_main` holds one `KVSender` per path (and
checksum mode) over a cache of random KV, and answers commands from the parent on a
pipe: set up for a dtype, send one transfer, or stream a raw Gloo baseline. The parent
is the decode side: `Bench` sends the commands, receives with its own `KVReceiver`s or
bare Gloo pair, and times each. `Memcpy` is the copy baseline, on the parent.
"""

from __future__ import annotations

import os
import random
import time
from datetime import timedelta
from multiprocessing.connection import Connection
from typing import Any

import torch
from torch._C._distributed_c10d import TCPStore

from engine.kv_cache import KVCache, KVCacheLayout
from engine.parallel.tcp_store import serve_tcp_store
from kv_transfer.base import InstanceRef, LocalRank, RecvSpec, SendSpec, TransferStatus
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import RedisRendezvous
from kv_transfer.sender import KVSender, SenderConfig
from kv_transfer.shm import ShmConfig, ShmConnector
from kv_transfer.torch_dist import TorchDistConfig, TorchDistConnector
from kv_transfer.torch_dist_pair import new_pair_group

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# SmolLM2-135M's KV geometry (engine/config.py reads the same from the model).
NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK = 30, 3, 64, 16
GEO = KVGeometry(NUM_LAYERS, NUM_KV_HEADS)
# (path, transport, zero-copy): each is measured with per-slice checksums on and off.
# None is the transport's default: over Gloo, slices in one run of blocks leave straight
# from the cache; "gather" copies every message out first.
PATHS = (
    ("torch_dist", "torch_dist", None),
    ("torch_dist gather", "torch_dist", False),
    ("shm", "shm", None),
)
WAIT_S = 120.0
# The cluster secret both processes seal and check control HELLOs with, as a cluster
# does (once per connection: nothing per transfer).
SECRET = b"pdserve benchmark: kv_transfer cluster secret"


def scattered_blocks(count: int, pool: int, seed: int) -> list[int]:
    """`count` block ids out of `pool`, as a cache that has served many requests hands
    them out: runs of 1 to 8 consecutive blocks (4.5 on average), in no order."""
    rng = random.Random(seed)
    runs, start = [], 0
    while start < pool:
        length = min(rng.randint(1, 8), pool - start)
        runs.append(range(start, start + length))
        start += length
    rng.shuffle(runs)
    return [block for run in runs for block in run][:count]


def layout(dtype: torch.dtype, num_blocks: int) -> KVCacheLayout:
    return KVCacheLayout(NUM_LAYERS, NUM_KV_HEADS, HEAD_DIM, BLOCK, num_blocks, dtype)


def to_gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9


class Memcpy:
    """Single-thread copies of a buffer far larger than the caches."""

    NBYTES = 256 << 20

    def __init__(self) -> None:
        self._src = torch.randint(0, 255, (self.NBYTES,), dtype=torch.uint8)
        self._dst = torch.empty_like(self._src)
        self.seconds()  # fault the pages in

    def seconds(self) -> float:
        """One timed copy, on one thread."""
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            began = time.perf_counter()
            self._dst.copy_(self._src)
            return time.perf_counter() - began
        finally:
            torch.set_num_threads(threads)

    def gbps(self, repeats: int = 5) -> float:
        return to_gbps(self.NBYTES, min(self.seconds() for _ in range(repeats)))


def _messages(msg_bytes: int, count: int) -> list[torch.Tensor]:
    """`count` messages of `msg_bytes`, one after another in one buffer (written once,
    so that its pages are in)."""
    return list(torch.ones(count * msg_bytes, dtype=torch.uint8).view(count, msg_bytes))


def _word_sum(buf: torch.Tensor) -> int:
    """One read pass over a message, as a checksum makes (64-bit word sum)."""
    return int(buf.view(torch.int64).sum())


# ---- the child: a prefill-side peer ----------------------------------------------------


def rendezvous_store(redis_url: str, cluster: str) -> RedisRendezvous:
    import redis

    return RedisRendezvous(redis.Redis.from_url(redis_url, socket_timeout=10.0), cluster)


def _wait_terminal(role: KVSender | KVReceiver, tid: str) -> TransferStatus:
    deadline = time.monotonic() + WAIT_S
    while True:
        status = role.poll(tid)
        if status.terminal or time.monotonic() > deadline:
            return status
        time.sleep(0.001)  # finer polling steals the GIL from the threads it measures


def peer_main(conn: Connection, redis_url: str, cluster: str) -> None:
    torch.set_num_threads(1)
    me = LocalRank("bench-prefill")
    senders: dict[tuple[str, bool], KVSender] = {}
    while True:
        cmd = conn.recv()
        if cmd[0] == "setup":
            _, dtype_name, num_blocks = cmd
            for sender in senders.values():
                sender.close()
            cache = KVCache(layout(DTYPES[dtype_name], num_blocks))
            cache.tensor.copy_(torch.randn(cache.tensor.shape).to(cache.tensor.dtype))
            store = rendezvous_store(redis_url, cluster)
            senders = {
                (path, checksum): KVSender(
                    me,
                    cache,
                    GEO,
                    TorchDistConnector(store, TorchDistConfig(zero_copy=zero_copy, secret=SECRET))
                    if transport == "torch_dist"
                    else ShmConnector(store, ShmConfig(secret=SECRET)),
                    SenderConfig(checksum=checksum),
                )
                for path, transport, zero_copy in PATHS
                for checksum in (True, False)
            }
            conn.send(("ok",))
        elif cmd[0] == "kv":
            _, path, checksum, tid, blocks, dest = cmd
            sender = senders[(path, checksum)]
            sender.open(SendSpec(tid, dest, 0, WAIT_S))
            began = time.monotonic()
            for layer in range(NUM_LAYERS):
                sender.send_layer(tid, layer, blocks, 0)
            sender.finish(tid)
            status = _wait_terminal(sender, tid)
            conn.send((began, status.state.value, status.reason))
        elif cmd[0] == "gloo":
            _, host, port, token, msg_bytes, count, rounds, summed, resident = cmd
            tcp = TCPStore(
                host, port, None, False, timeout=timedelta(seconds=30), wait_for_workers=False
            )
            group = new_pair_group(tcp, token, 0, "gloo", "127.0.0.1", 60.0)
            msgs = _messages(msg_bytes, 1 if resident else count)
            starts = []
            for _ in range(rounds):
                group.send([torch.ones(1, dtype=torch.uint8)], 1, 0).wait()  # both ready
                starts.append(time.monotonic())
                works = []
                for i in range(count):
                    msg = msgs[i % len(msgs)]
                    if summed:
                        _word_sum(msg)
                    works.append(group.send([msg], 1, 0))
                for work in works:
                    work.wait()
            conn.send((starts,))
            del group
        elif cmd[0] == "close":
            for sender in senders.values():
                sender.close()
            conn.send(("closed",))
            return


# ---- the parent: the decode side, driving the peer ---------------------------------------


class Bench:
    def __init__(self, conn: Connection, redis_url: str, cluster: str, repeats: int) -> None:
        self.conn, self.redis_url, self.cluster, self.repeats = conn, redis_url, cluster, repeats
        self._count = 0

    def call(self, *cmd: Any) -> Any:
        self.conn.send(cmd)
        if not self.conn.poll(WAIT_S):
            raise TimeoutError(f"peer did not answer {cmd[0]}")
        return self.conn.recv()

    def raw_gloo(
        self,
        msg_bytes: int,
        count: int,
        summed: bool = False,
        repeats: int | None = None,
        resident: bool = False,
    ) -> float:
        """Best seconds to stream `count` messages of `msg_bytes` over a bare Gloo pair,
        with every receive posted up front (one warm-up round, then `repeats` rounds,
        by default the bench's). The messages leave from, and land in, consecutive
        slices of a buffer of all of them on each side, as a transfer's bytes leave one
        cache and land in another. `resident`: the sender sends one buffer over and
        over, and the receiver takes them into a ring of 4, so that small streams run
        from the CPU's caches. `summed`: each side also reads every message once more,
        as a checksum does (the sender before it posts the send, the receiver once it
        has landed)."""
        store = serve_tcp_store("127.0.0.1", 30.0)
        token = os.urandom(16)
        rounds = (self.repeats if repeats is None else repeats) + 1
        self.conn.send(
            ("gloo", "127.0.0.1", store.port, token, msg_bytes, count, rounds, summed, resident)
        )
        group = new_pair_group(store, token, 1, "gloo", "127.0.0.1", 60.0)
        into = _messages(msg_bytes, min(count, 4) if resident else count)
        ends = []
        for _ in range(rounds):
            group.recv([torch.empty(1, dtype=torch.uint8)], 0, 0).wait()
            works = [group.recv([into[i % len(into)]], 0, 0) for i in range(count)]
            for i, work in enumerate(works):
                work.wait()
                if summed:
                    _word_sum(into[i % len(into)])
            ends.append(time.monotonic())
        (starts,) = self.conn.recv()
        del group
        return float(min(e - s for s, e in list(zip(starts, ends, strict=True))[1:]))

    def transfer(
        self,
        receiver: KVReceiver,
        path: str,
        checksum: bool,
        num_blocks: int,
        repeats: int | None = None,
        scattered_in: int | None = None,
    ) -> float:
        """Best seconds from the first send_layer to DONE on the receiver, over `repeats`
        transfers (by default the bench's). The blocks are the first ones of each cache,
        or, with `scattered_in` (the caches' size), `scattered_blocks` on both sides."""
        if scattered_in is None:
            src = dst = list(range(num_blocks))
        else:
            src = scattered_blocks(num_blocks, scattered_in, seed=1)
            dst = scattered_blocks(num_blocks, scattered_in, seed=2)
        times = []
        for _ in range(self.repeats if repeats is None else repeats):
            self._count += 1
            tid = f"bench-{self._count}"
            receiver.expect(RecvSpec(tid, tuple(dst), InstanceRef("bench-prefill"), 0, WAIT_S))
            self.conn.send(("kv", path, checksum, tid, src, InstanceRef(receiver.me.instance)))
            status = _wait_terminal(receiver, tid)
            ended = status.ended_at if status.ended_at is not None else time.monotonic()
            began, state, reason = self.conn.recv()
            if status.state.value != "done" or state != "done":
                raise RuntimeError(f"{path}: receiver {status}, sender {state} {reason}")
            times.append(ended - began)
        return float(min(times))
