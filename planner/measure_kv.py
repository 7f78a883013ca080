"""KV transfer time against bytes, measured directly on the configured transport.

* torch_dist: a Gloo pair (`kv_transfer.torch_dist_pair.new_pair_group`, over loopback)
  between this process and a spawned sender; for each size, the receiver posts one
  receive per layer, sends the sender a go byte, and times until the last layer has
  landed: the wire time and one round trip, without the transfer's header, checksums
  or landing in scattered blocks;
* shm: a single-thread copy of the bytes, the copy the shared segment adds.

Both keep the best of `repeats`, on one torch thread each side.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from datetime import timedelta
from multiprocessing.connection import Connection

import torch
from torch._C._distributed_c10d import TCPStore

from kv_transfer.torch_dist_pair import new_pair_group
from planner.profile import TransferPoint

TIMEOUT_S = 60.0


def measure_transfer(
    transport: str, sizes: list[int], layers: int, repeats: int
) -> list[TransferPoint]:
    if transport == "shm":
        return [TransferPoint(nbytes=n, seconds=_copy_seconds(n, repeats)) for n in sizes]
    if transport == "torch_dist":
        return _gloo_points(sizes, layers, repeats)
    raise ValueError(f"transport: unknown transport {transport!r}")


def _copy_seconds(nbytes: int, repeats: int) -> float:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        src = torch.ones(nbytes, dtype=torch.uint8)
        dst = torch.empty_like(src)
        dst.copy_(src)
        best = float("inf")
        for _ in range(repeats):
            began = time.perf_counter()
            dst.copy_(src)
            best = min(best, time.perf_counter() - began)
        return best
    finally:
        torch.set_num_threads(threads)


def _messages(nbytes: int, layers: int) -> list[int]:
    per = max(1, nbytes // layers)
    sizes = [per] * (nbytes // per)
    if nbytes % per:
        sizes.append(nbytes % per)
    return sizes


def _gloo_points(sizes: list[int], layers: int, repeats: int) -> list[TransferPoint]:
    store = TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=TIMEOUT_S), wait_for_workers=False
    )
    token = os.urandom(16)
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe()
    child = ctx.Process(
        target=_sender_main,
        args=(child_end, store.port, token, sizes, layers, repeats + 1),
        daemon=True,
    )
    child.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        group = new_pair_group(store, token, 1, "gloo", "127.0.0.1", TIMEOUT_S)
        points = []
        for nbytes in sizes:
            bufs = [torch.empty(n, dtype=torch.uint8) for n in _messages(nbytes, layers)]
            times = [_receive(group, bufs) for _ in range(repeats + 1)]
            points.append(TransferPoint(nbytes=nbytes, seconds=min(times[1:])))
        if not parent_end.poll(TIMEOUT_S):
            raise TimeoutError("the transfer sender did not finish")
        parent_end.recv()
        del group
        return points
    finally:
        torch.set_num_threads(threads)
        child.join(timeout=10)
        if child.is_alive():
            child.kill()
            child.join(timeout=5)


def _receive(group: object, bufs: list[torch.Tensor]) -> float:
    works = [group.recv([b], 0, 0) for b in bufs]  # type: ignore[attr-defined]
    began = time.perf_counter()
    group.send([torch.ones(1, dtype=torch.uint8)], 0, 0).wait()  # type: ignore[attr-defined]
    for w in works:
        w.wait()
    return time.perf_counter() - began


def _sender_main(
    conn: Connection, port: int, token: bytes, sizes: list[int], layers: int, rounds: int
) -> None:
    torch.set_num_threads(1)
    store = TCPStore(
        "127.0.0.1",
        port,
        None,
        False,
        timeout=timedelta(seconds=TIMEOUT_S),
        wait_for_workers=False,
    )
    group = new_pair_group(store, token, 0, "gloo", "127.0.0.1", TIMEOUT_S)
    go = torch.empty(1, dtype=torch.uint8)
    for nbytes in sizes:
        msgs = [torch.ones(n, dtype=torch.uint8) for n in _messages(nbytes, layers)]
        for _ in range(rounds):
            group.recv([go], 1, 0).wait()
            works = [group.send([m], 1, 0) for m in msgs]
            for w in works:
                w.wait()
    conn.send("done")
    del group
