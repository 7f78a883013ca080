"""Reusable staging buffers for payloads on their way through a transport.

Fresh multi-megabyte allocations cost page faults and zeroing on every message, about
as much as the copy they stage, so transports take staging buffers from a pool and
give them back once the message has gone out or been landed. The pool keeps at most
`max_bytes` of idle buffers, keyed by size and device; a typed tensor of any shape is
a view of one.

A receiver's pool also bounds the staging held by messages in flight (`max_in_use`):
a `take` beyond it waits, bounded, for buffers to come back, and one that can never
fit is refused at once, so no peer can make a receiver allocate without limit.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict

import torch

from kv_transfer.base import ProtocolError, TransferError


class StagingPool:
    def __init__(
        self,
        max_bytes: int = 256 << 20,
        max_in_use: int | None = None,
        wait_s: float = 10.0,
    ) -> None:
        """`max_bytes` of idle buffers are kept; at most `max_in_use` bytes are handed
        out at once (None: no bound), a `take` waiting up to `wait_s` for room."""
        if max_in_use is not None and max_in_use <= 0:
            raise ValueError(f"max_in_use must be > 0, got {max_in_use}")
        self._max = max_bytes
        self._max_in_use = max_in_use
        self._wait_s = wait_s
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._idle: defaultdict[tuple[int, torch.device], list[torch.Tensor]] = defaultdict(list)
        self._idle_bytes = 0
        self._in_use = 0

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    @property
    def in_use_bytes(self) -> int:
        return self._in_use

    def _reserve_locked(self, nbytes: int) -> None:
        limit = self._max_in_use
        if limit is None:
            self._in_use += nbytes
            return
        if nbytes > limit:
            raise ProtocolError(f"a payload of {nbytes} bytes exceeds the staging bound {limit}")
        deadline = time.monotonic() + self._wait_s
        while self._in_use + nbytes > limit:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TransferError(
                    f"no staging room for {nbytes} bytes within {self._wait_s:g}s "
                    f"({self._in_use} of {limit} in use)"
                )
            self._room.wait(left)
        self._in_use += nbytes

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialized contiguous tensor of `shape` and `dtype`."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            self._reserve_locked(nbytes)
            idle = self._idle.get((nbytes, device))
            raw = idle.pop() if idle else None
            if raw is not None:
                self._idle_bytes -= nbytes
        if raw is None:
            try:
                raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
            except BaseException:
                self._release(nbytes)
                raise
        return raw.view(dtype).view(shape)

    def forget(self, tensor: torch.Tensor) -> None:
        """Count a buffer from `take` as returned without reusing it (a receive into it
        failed, and its pair's teardown may still touch it)."""
        self._release(tensor.numel() * tensor.element_size())

    def _release(self, nbytes: int) -> None:
        with self._lock:
            self._in_use -= nbytes
            self._room.notify_all()

    def give(self, tensor: torch.Tensor) -> None:
        """Return a tensor from `take` once nothing reads or writes it any more."""
        raw = tensor.view(-1).view(torch.uint8)
        nbytes = raw.numel()
        with self._lock:
            self._in_use -= nbytes
            self._room.notify_all()
            if self._idle_bytes + nbytes <= self._max:
                self._idle[(nbytes, raw.device)].append(raw)
                self._idle_bytes += nbytes
