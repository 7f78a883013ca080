"""An instance's presence in the cluster registry: its lease, its load, its cached blocks.

Lifecycle (every pool's replica runs one; the prefill worker reuses this module):

    Presence(registry, info, load_fn, interval_s)
    on_cache_event(event, hash)   the engine's cache listener: buffers prefix-cache
                                  add/evict events (engine thread, never blocks)
    start()                       registers the lease (errors reach the caller) and
                                  starts the heartbeat and a publisher thread that,
                                  every `interval_s`, writes the load report and flushes
                                  the buffered block events to the prefix index
    suspend() / resume()          stop and restart the heartbeat without deregistering
                                  (the lease then expires within one TTL)
    stop()                        stops both threads and deregisters: the lease, load
                                  report and prefix set are deleted at once

When the heartbeat finds the lease had expired it registers again and republishes every
cached block, so the prefix index recovers from a Redis restart or a long pause.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from redis.exceptions import RedisError

from engine.block_pool import CacheEvent
from registry import Heartbeat, InstanceInfo, LoadReport, PrefixOp, Registry

logger = logging.getLogger(__name__)

_MAX_BUFFERED_EVENTS = 200_000


class Presence:
    def __init__(
        self,
        registry: Registry,
        info: InstanceInfo,
        load_fn: Callable[[], LoadReport],
        *,
        interval_s: float,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be positive")
        self._registry = registry
        self.info = info
        self._load_fn = load_fn
        self._interval_s = interval_s
        self._lock = threading.Lock()
        self._events: list[tuple[CacheEvent, int]] = []
        self._cached: set[int] = set()  # hashes published as present
        self._resync = False
        self._heartbeat: Heartbeat | None = None
        self._stopped = False
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._publish_loop, name=f"presence-{info.instance_id}", daemon=True
        )

    def on_cache_event(self, event: CacheEvent, block_hash: int) -> None:
        with self._lock:
            if len(self._events) < _MAX_BUFFERED_EVENTS:
                self._events.append((event, block_hash))
            else:  # Redis unreachable for long: republish everything when it is back
                self._resync = True

    def start(self) -> Presence:
        self._heartbeat = self._registry.start_heartbeat(
            self.info, load_fn=self._load_fn, on_reregistered=self._request_resync
        )
        self._thread.start()
        return self

    def suspend(self) -> None:
        """Stop heartbeating but keep the registration (it expires within one TTL)."""
        if self._heartbeat is not None:
            self._heartbeat.stop(deregister=False)

    def resume(self) -> None:
        if self._heartbeat is not None and not self._heartbeat.running:
            self._heartbeat.start()
            self._request_resync()

    @property
    def heartbeat_running(self) -> bool:
        return self._heartbeat is not None and self._heartbeat.running

    def stop(self) -> None:
        """Stop publishing and deregister (idempotent)."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5.0)
        if self._heartbeat is not None:
            try:
                self._heartbeat.stop(deregister=True)
            except (RedisError, OSError) as e:
                logger.warning("deregistering %s failed: %s", self.info.instance_id, e)

    # -- the publisher thread -----------------------------------------------------------

    def _request_resync(self) -> None:
        with self._lock:
            self._resync = True

    def _publish_loop(self) -> None:
        while not self._stop.wait(self._interval_s):
            if not self.heartbeat_running:
                continue  # suspended: publish nothing, let the lease lapse
            try:
                self._registry.report_load(self.info.instance_id, self._load_fn())
                self._flush()
            except (RedisError, OSError) as e:
                logger.warning("publishing for %s failed: %s", self.info.instance_id, e)
                self._request_resync()
            except Exception:
                logger.exception("publishing for %s failed", self.info.instance_id)
                self._request_resync()

    def _flush(self) -> None:
        with self._lock:
            events, self._events = self._events, []
            resync, self._resync = self._resync, False
        for event, block_hash in events:
            if event is CacheEvent.ADD:
                self._cached.add(block_hash)
            else:
                self._cached.discard(block_hash)
        iid = self.info.instance_id
        if resync:
            self._registry.publish_blocks(iid, PrefixOp.ADD, sorted(self._cached))
            return
        # Publish runs of the same operation in order, so add-then-evict stays evicted.
        run_op: CacheEvent | None = None
        run: list[int] = []
        tail: list[tuple[CacheEvent | None, int]] = [(None, 0)]
        for op_event, block_hash in [*events, *tail]:
            if op_event is not run_op and run:
                op = PrefixOp.ADD if run_op is CacheEvent.ADD else PrefixOp.EVICT
                self._registry.publish_blocks(iid, op, run)
                run = []
            if op_event is None:
                break
            run_op = op_event
            run.append(block_hash)
