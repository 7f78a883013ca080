"""The process groups one rank of a TP/PP engine uses, with no global world.

Every rank joins, over one TCPStore (its address comes from the driving rank, never
a fixed port):
- the instance group (all ranks): the driver broadcasts each step's inputs on it,
  and pipeline stages pass activations along it with send/recv;
- its stage's TP group: all-reduce and all-gather.
Groups are Gloo for CPU tensors and NCCL for CUDA tensors. Two timeouts: joining
waits up to `setup_timeout_s` for every rank to arrive (a rank may still be starting
its process and loading torch), then every operation is bounded by `timeout_s`, so a
dead peer surfaces as an error instead of a hang. An idle driver keeps the other ranks'
waits within `timeout_s` (engine/parallel/keepalive.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, Store, TCPStore

from engine.parallel.layout import ParallelLayout
from engine.parallel.tcp_store import serve_tcp_store


def make_group(
    store: Store,
    prefix: str,
    rank: int,
    size: int,
    device: torch.device,
    timeout_s: float,
    host: str = "127.0.0.1",
    setup_timeout_s: float | None = None,
) -> Any:
    """A process group of `size` ranks over `store` (gloo on CPU, nccl on CUDA); gloo
    binds this rank's end to `host`. Waits up to `setup_timeout_s` (default
    `timeout_s`) for all ranks to arrive; operations time out after `timeout_s`."""
    prefixed = PrefixStore(prefix, store)
    arrive(prefixed, rank, size, setup_timeout_s or timeout_s)
    timeout = timedelta(seconds=timeout_s)
    if device.type == "cpu":
        opts: Any = ProcessGroupGloo._Options()  # type: ignore[attr-defined]
        opts._timeout = timeout
        opts._devices = [ProcessGroupGloo.create_device(hostname=host)]
        return ProcessGroupGloo(prefixed, rank, size, opts)
    nccl: Any = getattr(dist, "ProcessGroupNCCL", None)
    if nccl is None:
        raise RuntimeError("this torch build has no NCCL")
    nopts = nccl.Options()
    nopts._timeout = timeout
    return nccl(prefixed, rank, size, nopts)


def arrive(store: Store, rank: int, size: int, timeout_s: float) -> None:
    """Mark this rank arrived and wait (bounded) until all `size` ranks have."""
    store.set(f"arrived/{rank}", "1")
    keys = [f"arrived/{r}" for r in range(size)]
    try:
        store.wait(keys, timedelta(seconds=timeout_s))
    except Exception as e:
        missing = [r for r in range(size) if not store.check([f"arrived/{r}"])]
        raise TimeoutError(f"ranks {missing} did not join within {timeout_s:g}s: {e}") from e


@dataclass(frozen=True)
class StoreAddress:
    host: str
    port: int


def serve_store(timeout_s: float = 30.0, host: str = "127.0.0.1") -> tuple[TCPStore, StoreAddress]:
    """Start the driver's TCPStore on a free port of `host` only (tcp_store.py); the
    other ranks reach it there."""
    store = serve_tcp_store(host, timeout_s)
    return store, StoreAddress(host, store.port)


def connect_store(addr: StoreAddress, timeout_s: float = 30.0) -> TCPStore:
    return TCPStore(addr.host, addr.port, is_master=False, timeout=timedelta(seconds=timeout_s))


class RankGroups:
    """One rank's groups and the collectives the sharded model needs."""

    def __init__(
        self,
        layout: ParallelLayout,
        store: Store,
        device: torch.device,
        timeout_s: float = 60.0,
        namespace: str = "engine",
        host: str = "127.0.0.1",
        setup_timeout_s: float | None = None,
    ) -> None:
        self.layout = layout
        self.device = device
        self.timeout_s = timeout_s
        self.instance = make_group(
            store,
            f"{namespace}/all",
            layout.rank,
            layout.world_size,
            device,
            timeout_s,
            host,
            setup_timeout_s,
        )
        self.tp = make_group(
            store,
            f"{namespace}/tp{layout.pp_rank}",
            layout.tp_rank,
            layout.tp,
            device,
            timeout_s,
            host,
            setup_timeout_s,
        )

    # TP collectives (within this rank's stage)
    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        if self.layout.tp > 1:
            self.tp.allreduce([t]).wait()
        return t

    def all_gather_last_dim(self, t: torch.Tensor) -> torch.Tensor:
        if self.layout.tp == 1:
            return t
        parts = [torch.empty_like(t) for _ in range(self.layout.tp)]
        self.tp.allgather([parts], [t.contiguous()]).wait()
        return torch.cat(parts, dim=-1)

    # instance-wide
    def broadcast(self, t: torch.Tensor, src: int = 0) -> torch.Tensor:
        opts = dist.BroadcastOptions()
        opts.rootRank = src
        opts.rootTensor = 0
        self.instance.broadcast([t], opts).wait()
        return t

    def send(self, t: torch.Tensor, dst: int) -> None:
        self.instance.send([t.contiguous()], dst, 0).wait()

    def isend(self, t: torch.Tensor, dst: int) -> Any:
        """Start sending a contiguous `t`; wait on the returned work before reusing it."""
        return self.instance.send([t], dst, 0)

    def recv(self, t: torch.Tensor, src: int) -> torch.Tensor:
        self.instance.recv([t], src, 0).wait()
        return t
