"""Keeping an idle TP/PP engine's other ranks within their groups' timeout.

Ranks 1..N-1 wait for rank 0's next step in a broadcast, and the groups' timeout
bounds every wait, so that a dead driver surfaces as an error instead of a hang. An
engine with no work sends no steps; without more, its other ranks would time out
after the group timeout of idleness and the instance would be lost. So rank 0 runs a
`Keepalive`: whenever no step went out for `interval_s` (a fraction of the timeout),
its thread broadcasts an IDLE step, which the other ranks skip.

Lifecycle:

    Keepalive(send_idle, interval_s).start()   the thread starts
    with keepalive.step(): ...                 around every step rank 0 broadcasts;
                                               one lock, so an IDLE never lands between
                                               a step's broadcast and its collectives
    stop()                                     the thread ends (bounded join); the
                                               caller then broadcasts STOP itself

A keepalive that fails (a rank died, the groups are broken) is logged, kept in
`failure` and ends the thread; the next step then fails with the groups' error, and
`check()` raises it at once, so a health check sees a dead rank of an idle engine.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)


class Keepalive:
    def __init__(self, send_idle: Callable[[], None], interval_s: float) -> None:
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self._send_idle = send_idle
        self.interval_s = interval_s
        self._lock = threading.Lock()
        self._last = time.monotonic()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rank-keepalive", daemon=True)
        self.num_sent = 0
        self.failure: BaseException | None = None

    def check(self) -> None:
        """Raise if a keepalive failed: the other ranks are unreachable."""
        if self.failure is not None:
            raise RuntimeError(f"the other ranks are unreachable: {self.failure}")

    def start(self) -> Keepalive:
        self._thread.start()
        return self

    @contextlib.contextmanager
    def step(self) -> Iterator[None]:
        with self._lock:
            try:
                yield
            finally:
                self._last = time.monotonic()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stopped.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stopped.wait(self.interval_s / 4):
            if time.monotonic() - self._last < self.interval_s:
                continue
            if not self._lock.acquire(blocking=False):
                continue  # a step is running: it resets the clock
            try:
                if self._stopped.is_set():
                    return
                self._send_idle()
                self.num_sent += 1
                self._last = time.monotonic()
            except Exception as e:
                log.exception("idle keepalive to the other ranks failed")
                self.failure = e
                return
            finally:
                self._lock.release()
