"""The sender's end of a torch_dist pair (kv_transfer/torch_dist.py).

Per DATA message the sender gathers the slice into a staging tensor (summing it as it
copies, when the message carries a checksum) and writes the header on the control
socket; a poster thread then posts asynchronous sends, and a waiter thread waits on
them in order and resolves their completions. With `zero_copy`, a slice whose blocks
are one run with all heads goes in parts straight from the cache, with no gather. Any
error or timeout tears the pair down (control socket closed, NCCL group aborted).
"""

from __future__ import annotations

import queue
import threading
from typing import Any

import torch
from torch._C._distributed_c10d import Store

from kv_transfer.base import RankId, TransferError
from kv_transfer.control import ControlClient
from kv_transfer.header import Header
from kv_transfer.region_copies import gather_checksummed
from kv_transfer.regions import BlockRegion, LayerSpan
from kv_transfer.staging import StagingPool
from kv_transfer.torch_dist_pair import abort_group, wait_work
from kv_transfer.transport import (
    Completion,
    Link,
    in_parts,
    message_parts,
    region_parts,
    splits,
)


class SendLink(Link):
    """The sender's end of a pair: headers on the control socket, payloads posted as
    sends on the group by one thread and waited on, in order, by another."""

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
                    wait_work(work, self._backend, self._timeout)
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
            abort_group(self._group)

    def close(self) -> None:
        """Tear down without waiting (callers include `poll`): the poster fails what is
        still queued, and the waiter thread ends by itself once the group's own timeout
        has failed whatever is still pending."""
        self._break()
        self._posts.put(None)
        self._group = None  # the sockets close once pending works are gone
