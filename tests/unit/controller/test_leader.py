"""One controller acts per cluster: the lease against a real redis-server (taken when
free, renewed only by its holder, released only by it, free again once it expires),
and two controller loops on one cluster, of which only the holder steers the routing
table until it stops and the other takes over."""

from __future__ import annotations

import time
from collections.abc import Callable

import redis

from cluster.redis_server import RedisServer
from controller.actor import ControllerActor
from controller.settings import ControllerSettings, PlannerConfig
from registry import Registry
from registry.leader import Leadership

Clean = Callable[[Registry], None]


def test_the_lease_has_one_holder_at_a_time(registry: Registry, redis_client: redis.Redis) -> None:
    a = Leadership(redis_client, registry.keys, "a", ttl_s=0.3)
    b = Leadership(redis_client, registry.keys, "b", ttl_s=0.3)
    assert a.hold() and not b.hold()
    assert a.hold()  # renewed
    assert not b.release()  # not b's to release
    assert a.release() and b.hold() and not a.hold()
    time.sleep(0.45)  # b stopped renewing: its lease expires
    assert a.hold() and not b.hold()
    assert a.release()
    assert registry.namespace_keys() == set()


def _settings(registry: Registry, url: str) -> ControllerSettings:
    planner = PlannerConfig.model_validate(
        {"enabled": True, "fast_period_s": 0.1, "slow_period_s": 1.0}
    )
    return ControllerSettings(
        cluster=registry.cluster,
        app_name="pdserve",
        redis_url=url,
        lease_ttl_s=5.0,
        prefill_pool="prefill",
        decode_pool="decode",
        replicas={"prefill": 1, "decode": 1},
        initial_threshold=32,
        planner=planner,
    )


def _wait(cond: Callable[[], bool], timeout_s: float) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if cond():
            return True
        time.sleep(0.05)
    return cond()


def test_a_second_controller_waits_then_takes_over(
    registry: Registry, redis_server: RedisServer
) -> None:
    settings = _settings(registry, redis_server.url)
    first = ControllerActor(settings)
    second = ControllerActor(settings)
    try:
        assert first.leading() and not second.leading()
        assert registry.routing.read().threshold == 32  # the leader reset the table
        registry.routing.set_threshold(99)  # as a threshold move of the leader's
        time.sleep(0.5)  # several ticks: the second one never takes the lease
        assert first.leading() and not second.leading()
        assert registry.routing.read().threshold == 99
        first.stop()  # clears the table, then releases the lease
        assert not first.leading()
        assert _wait(second.leading, 5.0)
        assert registry.routing.read().threshold == 32  # the new leader's reset
        first.stop()  # idempotent
    finally:
        first.stop()
        second.stop()
    assert registry.routing.read().roles == {}
    assert registry.keys.controller not in registry.namespace_keys()
