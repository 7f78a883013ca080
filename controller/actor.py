"""The controller as a detached Ray actor, one per cluster.

Lifecycle:

    start(settings)          `pdserve up` (cluster.launcher) creates the actor, named
                             `actor_name(cluster)` in the `pdserve` namespace, detached
                             (it outlives the driver that created it, like Serve's
                             own controller), after the application is ready
    ControllerActor(...)     connect to Redis; start the loop thread: a fast tick
                             every `fast_period_s`, and every `slow_period_s` that tick
                             runs the slow loop too
    each tick                hold the cluster's controller lease (`registry.leader`)
                             first; a controller without it waits. On taking it, reset
                             the routing table to the config (no overrides, the
                             config's threshold), then act on every tick it keeps it
    decisions()              the decisions so far, as records (status, tests)
    stop()                   end the loop (bounded); if it holds the lease, clear the
                             routing table and release the lease; close Redis.
                             `pdserve down` calls it, then kills the actor. Idempotent.

The same object runs inside the Serve deployment `controller.deployment` (the way
`pdserve render k8s` deploys it). The lease makes the controller unique per cluster
whichever way it was started: a restarted one, or a second one while the first is
still stopping, acts only once the other released the lease or it expired.

A tick that fails (Redis unreachable) is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from controller.controller import Controller
from controller.metrics import RayMetrics
from controller.refusals import MetricsScraper
from controller.scaler import ServeScaler
from controller.settings import ControllerSettings
from registry import Registry, connect
from registry.leader import Leadership

logger = logging.getLogger(__name__)

NAMESPACE = "pdserve"
_STOP_TIMEOUT_S = 10.0


def actor_name(cluster: str) -> str:
    return f"pdserve-controller-{cluster}"


def lease_ttl_s(fast_period_s: float) -> float:
    """How long a controller that stopped ticking keeps the lease: three fast periods
    and a margin, so a holder that ticks late does not lose it."""
    return 3.0 * fast_period_s + 5.0


class ControllerActor:
    def __init__(self, settings: ControllerSettings, record: str | None = None) -> None:
        self._redis = connect(settings.redis_url, client_name=f"{settings.cluster}-controller")
        registry = Registry(self._redis, settings.cluster, lease_ttl_s=settings.lease_ttl_s)
        scaler = ServeScaler(settings.app_name) if settings.planner.scaling else None
        self._metrics = RayMetrics(settings.cluster)
        self._ctl = Controller(
            settings,
            registry,
            scaler,
            self._metrics,
            Path(record) if record else None,
            MetricsScraper(settings.app_name).read,
        )
        holder = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._lease = Leadership(
            self._redis, registry.keys, holder, lease_ttl_s(settings.planner.fast_period_s)
        )
        self._leading = False
        self._stopped = False
        self._lead()  # at once when the lease is free, so a new cluster starts as configured
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="controller", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        cfg = self._ctl.settings.planner
        next_slow = time.monotonic() + cfg.slow_period_s
        while not self._stop.wait(cfg.fast_period_s):
            now = time.monotonic()
            slow = now >= next_slow
            if slow:
                next_slow = now + cfg.slow_period_s
            try:
                if self._lead():
                    self._ctl.tick(now, slow)
            except (RedisError, OSError) as e:
                logger.warning("controller tick failed: %s", e)
            except Exception:
                logger.exception("controller tick failed")

    def _lead(self) -> bool:
        """Hold the lease; True while this controller acts."""
        held = self._lease.hold()
        if held and not self._leading:
            logger.info("controller %s took the lease; resetting the routing table",
                        self._lease.holder)  # fmt: skip
            self._ctl.start()
        elif self._leading and not held:
            logger.warning("controller %s lost the lease", self._lease.holder)
        self._leading = held
        self._metrics.leading(held)
        return held

    def ready(self) -> bool:
        return self._thread.is_alive()

    def leading(self) -> bool:
        return self._leading

    def decisions(self) -> list[dict[str, object]]:
        return [a.record() for a in self._ctl.decisions]

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self._thread.join(_STOP_TIMEOUT_S)
        try:
            if self._lease.hold():
                self._ctl.stop()
                self._lease.release()
        except (RedisError, OSError) as e:
            logger.warning("clearing the routing table failed: %s", e)
        self._leading = False
        self._metrics.leading(False)
        self._redis.close()


def log_to(handlers: list[logging.Handler]) -> None:
    """Send the controller's log lines (INFO and up: every decision) to `handlers`, in
    a Ray process whose root logger would drop them."""
    log = logging.getLogger("controller")
    if log.handlers:
        return
    for handler in handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


class DetachedController(ControllerActor):
    """The actor `start` creates: its log lines go to the actor's stderr, which Ray
    keeps in the worker's log file (and shows on the driver that logs to it)."""

    def __init__(self, settings: ControllerSettings, record: str | None = None) -> None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        log_to([handler])
        super().__init__(settings, record)


def start(settings: ControllerSettings, record: str | None = None) -> Any:
    """Create the cluster's controller actor (the caller is connected to Ray) and wait,
    bounded, until its loop runs; returns the actor handle."""
    import ray

    cls: Any = ray.remote(DetachedController)
    handle = cls.options(
        name=actor_name(settings.cluster),
        namespace=NAMESPACE,
        lifetime="detached",
        num_cpus=0,
        max_restarts=3,
    ).remote(settings, record)
    ray.get(handle.ready.remote(), timeout=60.0)
    return handle


def stop(cluster: str) -> bool:
    """Stop and kill the cluster's controller actor; False if there was none."""
    import ray

    try:
        handle = ray.get_actor(actor_name(cluster), namespace=NAMESPACE)
    except ValueError:
        return False
    try:
        ray.get(handle.stop.remote(), timeout=_STOP_TIMEOUT_S + 5.0)
    except Exception as e:
        logger.warning("controller stop: %s", e)
    ray.kill(handle)
    return True
