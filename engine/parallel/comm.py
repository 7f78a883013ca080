"""The process groups one rank of a TP/PP engine uses, with no global world.

Every rank joins, over one TCPStore (its address comes from the driving rank, never
a fixed port):
- the instance group (all ranks): the driver broadcasts each step's inputs on it,
  and pipeline stages pass activations along it with send/recv;
- its stage's TP group: all-reduce and all-gather.
Groups are Gloo for CPU tensors and NCCL for CUDA tensors, each with a short timeout,
so a dead peer surfaces as an error instead of a hang.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, Store, TCPStore

from engine.parallel.layout import ParallelLayout


def make_group(
    store: Store,
    prefix: str,
    rank: int,
    size: int,
    device: torch.device,
    timeout_s: float,
    host: str = "127.0.0.1",
) -> Any:
    """A process group of `size` ranks over `store` (gloo on CPU, nccl on CUDA); gloo
    binds this rank's end to `host`."""
    prefixed = PrefixStore(prefix, store)
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


@dataclass(frozen=True)
class StoreAddress:
    host: str
    port: int


def serve_store(timeout_s: float = 30.0, host: str = "127.0.0.1") -> tuple[TCPStore, StoreAddress]:
    """Start the driver's TCPStore on a free port; the other ranks reach it at `host`."""
    store = TCPStore(
        host, 0, is_master=True, wait_for_workers=False, timeout=timedelta(seconds=timeout_s)
    )
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
    ) -> None:
        self.layout = layout
        self.device = device
        self.instance = make_group(
            store, f"{namespace}/all", layout.rank, layout.world_size, device, timeout_s, host
        )
        self.tp = make_group(
            store,
            f"{namespace}/tp{layout.pp_rank}",
            layout.tp_rank,
            layout.tp,
            device,
            timeout_s,
            host,
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
