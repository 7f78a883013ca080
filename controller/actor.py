"""The controller as a detached Ray actor, one per cluster.

Lifecycle:

    start(settings)          `pdserve up` (cluster.launcher) creates the actor, named
                             `actor_name(cluster)` in the `pdserve` namespace, detached
                             (it outlives the driver that created it, like Serve's
                             own controller), after the application is ready
    ControllerActor(...)     connect to Redis; reset the routing table to the config
                             (no overrides, the config's threshold); start the loop
                             thread: a fast tick every `fast_period_s`, and every
                             `slow_period_s` that tick runs the slow loop too
    decisions()              the decisions so far, as records (status, tests)
    stop()                   end the loop (bounded), clear the routing table, close
                             Redis; `pdserve down` calls it, then kills the actor

A tick that fails (Redis unreachable) is logged and the loop goes on.
"""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path
from typing import Any

from redis.exceptions import RedisError

from controller.controller import Controller
from controller.metrics import RayMetrics
from controller.scaler import ServeScaler
from controller.settings import ControllerSettings
from registry import Registry, connect

logger = logging.getLogger(__name__)

NAMESPACE = "pdserve"
_STOP_TIMEOUT_S = 10.0


def actor_name(cluster: str) -> str:
    return f"pdserve-controller-{cluster}"


class ControllerActor:
    def __init__(self, settings: ControllerSettings, record: str | None = None) -> None:
        self._redis = connect(settings.redis_url, client_name=f"{settings.cluster}-controller")
        registry = Registry(self._redis, settings.cluster, lease_ttl_s=settings.lease_ttl_s)
        scaler = ServeScaler(settings.app_name) if settings.planner.scaling else None
        self._ctl = Controller(
            settings,
            registry,
            scaler,
            RayMetrics(settings.cluster),
            Path(record) if record else None,
        )
        self._ctl.start()
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
                self._ctl.tick(now, slow)
            except (RedisError, OSError) as e:
                logger.warning("controller tick failed: %s", e)
            except Exception:
                logger.exception("controller tick failed")

    def ready(self) -> bool:
        return self._thread.is_alive()

    def decisions(self) -> list[dict[str, object]]:
        return [a.record() for a in self._ctl.decisions]

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(_STOP_TIMEOUT_S)
        try:
            self._ctl.stop()
        except (RedisError, OSError) as e:
            logger.warning("clearing the routing table failed: %s", e)
        self._redis.close()


def start(settings: ControllerSettings, record: str | None = None) -> Any:
    """Create the cluster's controller actor (the caller is connected to Ray) and wait,
    bounded, until its loop runs; returns the actor handle."""
    import ray

    cls: Any = ray.remote(ControllerActor)
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
