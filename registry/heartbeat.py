"""A heartbeat thread that keeps an instance's lease (and optionally its load) fresh.

Lifecycle: `start()` registers the instance synchronously (so a bad Redis URL fails in
the caller), then a daemon thread calls `Registry.refresh` every `interval_s` until
`stop()` sets the stop event. Each refresh is bounded by the client's socket timeout;
a failed refresh is logged and retried on the next tick, and the instance drops out
of routing if failures outlast the lease TTL. When a refresh finds the lease had
expired (a long pause, a Redis restart), the instance is registered again and
`on_reregistered` runs so the owner can republish state such as its cached blocks.
`stop(deregister=True)` joins the thread (with a timeout) and then deregisters.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING

from redis.exceptions import RedisError

from registry.types import InstanceInfo, LoadReport

if TYPE_CHECKING:
    from registry.registry import Registry

logger = logging.getLogger(__name__)


class Heartbeat:
    def __init__(
        self,
        registry: Registry,
        info: InstanceInfo,
        *,
        interval_s: float,
        load_fn: Callable[[], LoadReport] | None = None,
        on_reregistered: Callable[[], None] | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        if interval_s >= registry.lease_ttl_s:
            raise ValueError(
                f"heartbeat interval {interval_s}s must be shorter than the lease TTL "
                f"{registry.lease_ttl_s}s"
            )
        self._registry = registry
        self._info = info
        self._interval_s = interval_s
        self._load_fn = load_fn
        self._on_reregistered = on_reregistered
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_success: float | None = None  # time.monotonic()
        self._failures = 0

    @property
    def info(self) -> InstanceInfo:
        return self._info

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    @property
    def last_success(self) -> float | None:
        """`time.monotonic()` of the last successful refresh."""
        return self._last_success

    def start(self) -> Heartbeat:
        if self._thread is not None:
            raise RuntimeError("heartbeat already started")
        load = self._load_fn() if self._load_fn is not None else None
        self._registry.refresh(self._info, load)  # errors reach the caller
        self._last_success = time.monotonic()
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._run, name=f"heartbeat-{self._info.instance_id}", daemon=True
        )
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            self._beat()

    def _beat(self) -> None:
        try:
            load = self._load_fn() if self._load_fn is not None else None
            was_live = self._registry.refresh(self._info, load)
        except (RedisError, OSError) as exc:
            self._failures += 1
            logger.warning(
                "heartbeat of %s failed (%d in a row): %s",
                self._info.instance_id,
                self._failures,
                exc,
            )
            return
        except Exception:
            self._failures += 1
            logger.exception("heartbeat of %s failed", self._info.instance_id)
            return
        self._failures = 0
        self._last_success = time.monotonic()
        if not was_live:
            logger.warning("lease of %s had expired; registered again", self._info.instance_id)
            if self._on_reregistered is not None:
                try:
                    self._on_reregistered()
                except Exception:
                    logger.exception("on_reregistered of %s failed", self._info.instance_id)

    def stop(self, *, deregister: bool = True, timeout_s: float = 5.0) -> None:
        """Stop beating; idempotent. With `deregister`, the instance leaves the registry
        now instead of when its lease expires."""
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                logger.warning(
                    "heartbeat of %s did not stop within %.1fs", self._info.instance_id, timeout_s
                )
        if deregister:
            self._registry.deregister(self._info.instance_id)

    def __enter__(self) -> Heartbeat:
        if self._thread is None:
            self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
