"""Streams on a decode replica that Serve is stopping (scale-down, redeploy).

Serve takes a stopping replica out of its routers' replica sets at once, then lets it
finish its ongoing calls for up to the pool's `graceful_shutdown_timeout_s` before it
kills it. Each handle's router reports the drop (router/replica_deaths.py); from then:

    routing      the cluster view's breaker has excluded the replica, so no new request
                 goes there (a probe cannot bring it back: Serve no longer reaches it)
    its streams  go on there for `grace_s` (half the shutdown timeout); one still
                 running then is moved to another decode instance (router.migration),
                 which leaves the other half for the move and for the replica to end
                 its calls before Serve kills it

A replica that died is dropped the same way; its streams have failed already.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

_MEMORY_S = 600.0  # how long a stopped replica is remembered


class StoppedReplicas:
    def __init__(self, grace_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        if grace_s <= 0:
            raise ValueError(f"grace_s must be > 0, got {grace_s}")
        self.grace_s = grace_s
        self._clock = clock
        self._at: dict[str, float] = {}  # address -> when Serve dropped it
        self._lock = threading.Lock()  # Serve may report from another thread

    def stopped(self, address: str) -> None:
        now = self._clock()
        with self._lock:
            for old, at in list(self._at.items()):
                if now - at > _MEMORY_S:
                    del self._at[old]
            self._at.setdefault(address, now)

    def deadline(self, address: str) -> float | None:
        """When a stream on `address` must move (on the clock given), or None."""
        with self._lock:
            at = self._at.get(address)
        return None if at is None else at + self.grace_s
