"""Admission control: a bound on the requests one router replica holds at once.

Beyond it new requests are refused at once (RESOURCE_EXHAUSTED / HTTP 429) rather than
queued without limit; the engines' own schedulers queue what was admitted.
"""

from __future__ import annotations


class Admission:
    def __init__(self, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.max_inflight = max_inflight
        self.inflight = 0

    def try_acquire(self) -> bool:
        """Called on the event loop only, so no lock is needed."""
        if self.inflight >= self.max_inflight:
            return False
        self.inflight += 1
        return True

    def release(self) -> None:
        if self.inflight <= 0:
            raise RuntimeError("released more often than acquired")
        self.inflight -= 1
