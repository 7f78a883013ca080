"""A torch_dist pair's own 2-rank process group, and waiting on its operations.

Every (sender rank, receiver rank) pair builds a ProcessGroupGloo (CPU tensors) or
ProcessGroupNCCL (CUDA ones) of size 2 over a `PrefixStore` named by the pair's token
on the receiver's TCPStore: rank 0 is the sender, rank 1 the receiver. No global world
and no init_process_group. A Gloo operation's wait is bounded by the group's timeout;
an NCCL one is polled until its completion, bounded by the caller's.
"""

from __future__ import annotations

import logging
import time
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, ProcessGroupGloo, Store

from kv_transfer.base import TransferError

logger = logging.getLogger(__name__)

_POLL_S = 1e-4  # NCCL completion polling


def backend_for(device: torch.device) -> str:
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


def wait_work(work: Any, backend: str, timeout_s: float) -> None:
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


def abort_group(group: Any) -> None:
    abort = getattr(group, "abort", None)
    if abort is not None:
        try:
            abort()
        except Exception as e:  # best effort: the group is being dropped anyway
            logger.debug("abort failed: %s", e)
