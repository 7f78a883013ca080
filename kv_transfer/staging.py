"""Reusable staging buffers for payloads on their way through a transport.

Fresh multi-megabyte allocations cost page faults and zeroing on every message, about
as much as the copy they stage, so transports take staging buffers from a pool and
give them back once the message has gone out or been landed. The pool keeps at most
`max_bytes` of idle buffers, keyed by size and device; a typed tensor of any shape is
a view of one.
"""

from __future__ import annotations

import threading
from collections import defaultdict

import torch


class StagingPool:
    def __init__(self, max_bytes: int = 256 << 20) -> None:
        self._max = max_bytes
        self._lock = threading.Lock()
        self._idle: defaultdict[tuple[int, torch.device], list[torch.Tensor]] = defaultdict(list)
        self._idle_bytes = 0

    @property
    def idle_bytes(self) -> int:
        return self._idle_bytes

    def take(
        self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
    ) -> torch.Tensor:
        """An uninitialized contiguous tensor of `shape` and `dtype`."""
        numel = 1
        for d in shape:
            numel *= d
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        with self._lock:
            idle = self._idle.get((nbytes, device))
            raw = idle.pop() if idle else None
            if raw is not None:
                self._idle_bytes -= nbytes
        if raw is None:
            raw = torch.empty(nbytes, dtype=torch.uint8, device=device)
        return raw.view(dtype).view(shape)

    def give(self, tensor: torch.Tensor) -> None:
        """Return a tensor from `take` once nothing reads or writes it any more."""
        raw = tensor.view(-1).view(torch.uint8)
        nbytes = raw.numel()
        with self._lock:
            if self._idle_bytes + nbytes <= self._max:
                self._idle[(nbytes, raw.device)].append(raw)
                self._idle_bytes += nbytes
