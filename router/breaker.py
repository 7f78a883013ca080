"""A per-instance circuit breaker: instances this router saw fail stay out of routing
until they prove they are alive again.

    closed  --trip(address, kind, ..)-> open      a pool call raised a death-like error
                                                  (`worker_errors.is_instance_failure`),
                                                  or Serve
                                                  dropped the replica
    open    --probe_due(address, hb)->  probing   its heartbeat (load report) is newer
                                                  than the trip: one probe is started
    probing --probed(address, True)-->  closed    back in the candidate set
    probing --probed(address, False)->  open      tripped again, from now: it needs a
                                                  newer heartbeat still

Entries are keyed by the instance's address (its Serve replica's unique id, never
reused) and dropped by `forget` once the registry no longer lists the instance. Times
are wall-clock seconds, the same clock as the heartbeats'; the clock is injectable for
tests. All methods are cheap and thread-safe (Serve may report deaths from another
thread than the router's loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

logger = logging.getLogger(__name__)


@dataclass
class _Trip:
    at: float  # wall-clock time of the trip
    reason: str
    probing: bool = False


class CircuitBreaker:
    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        on_trip: Callable[[str], None] | None = None,
    ) -> None:
        self._clock = clock
        self._on_trip = on_trip  # called with the kind of each new exclusion
        self._open: dict[str, _Trip] = {}
        self._lock = threading.Lock()
        self.trips = 0  # every trip, for metrics and tests

    def trip(self, address: str, kind: str, detail: str) -> bool:
        """Exclude the instance; True if it was not excluded already. A trip while a
        probe runs restarts the exclusion from now, and that probe's result is ignored."""
        with self._lock:
            current = self._open.get(address)
            if current is not None and not current.probing:
                return False
            self._open[address] = _Trip(self._clock(), f"{kind}: {detail}")
            self.trips += 1
        logger.warning("instance %s leaves routing (%s): %s", address, kind, detail)
        if self._on_trip is not None:
            self._on_trip(kind)
        return True

    def excluded(self, address: str) -> bool:
        return address in self._open

    def excluded_addresses(self) -> set[str]:
        with self._lock:
            return set(self._open)

    def probe_due(self, address: str, heartbeat: float | None) -> bool:
        """True (once, until `probed`) when an open instance heartbeated after its trip."""
        with self._lock:
            t = self._open.get(address)
            if t is None or t.probing or heartbeat is None or heartbeat <= t.at:
                return False
            t.probing = True
            return True

    def probed(self, address: str, ok: bool, detail: str = "") -> None:
        with self._lock:
            t = self._open.get(address)
            if t is None or not t.probing:
                return
            if ok:
                del self._open[address]
            else:
                self._open[address] = _Trip(self._clock(), f"probe: {detail}")
                self.trips += 1
        if self._on_trip is not None and not ok:
            self._on_trip("probe")
        if ok:
            logger.info("instance %s is back in routing", address)
        else:
            logger.warning("instance %s stays out of routing: probe failed: %s", address, detail)

    def forget(self, live: Iterable[str]) -> None:
        """Drop entries of instances the registry no longer lists."""
        keep = set(live)
        with self._lock:
            for address in [a for a in self._open if a not in keep]:
                del self._open[address]
