"""Instance leases, heartbeats and load reports against a real redis-server."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
import redis
from pydantic import ValidationError

from cluster.redis_server import RedisServer
from registry import (
    InstanceInfo,
    Keyspace,
    LoadReport,
    PrefixOp,
    Registry,
    Role,
    connect,
    new_instance_id,
)

Clean = Callable[[Registry], None]


def _info(instance_id: str, pool: str = "decode", role: Role = Role.DECODE) -> InstanceInfo:
    return InstanceInfo(instance_id=instance_id, pool=pool, role=role, address="actor-" + pool)


def _load(free: int = 90, queued: int = 0) -> LoadReport:
    return LoadReport(
        queued_prefill_tokens=queued, running_seqs=2, free_kv_blocks=free, total_kv_blocks=100
    )


def _wait_until(cond: Callable[[], bool], timeout_s: float, step_s: float = 0.02) -> float:
    """Seconds until `cond()` held; fails the test after `timeout_s`."""
    start = time.monotonic()
    while not cond():
        if time.monotonic() - start > timeout_s:
            pytest.fail(f"condition not met within {timeout_s}s")
        time.sleep(step_s)
    return time.monotonic() - start


def test_register_list_deregister(registry: Registry, assert_clean: Clean) -> None:
    p0, d0, d1 = _info("p0", "prefill", Role.PREFILL), _info("d0"), _info("d1")
    for info in (d1, p0, d0, d0):  # registering again is harmless
        registry.register(info)
    assert registry.live_instances() == [d0, d1, p0]
    assert registry.live_instances(pool="prefill") == [p0]
    assert registry.live_instances(pool="nope") == []

    updated = InstanceInfo(instance_id="d0", pool="decode", role=Role.DECODE, tp=2)
    registry.register(updated)
    assert registry.live_instances(pool="decode") == [updated, d1]

    for instance_id in ("d0", "d1", "p0", "p0"):  # deregistering again is harmless
        registry.deregister(instance_id)
    assert_clean(registry)


def test_lease_ttl_is_applied(registry: Registry, redis_client: redis.Redis) -> None:
    registry.register(_info("d0"))
    ttl_ms = redis_client.pttl(registry.keys.instance("d0"))
    assert 0 < ttl_ms <= registry.lease_ttl_s * 1000
    registry.deregister("d0")


def test_dead_instance_leaves_within_one_ttl(
    make_registry: Callable[..., Registry], redis_client: redis.Redis, assert_clean: Clean
) -> None:
    """A crashed instance (heartbeat stopped, no deregister) drops out of
    `live_instances` within one TTL of its last heartbeat, and its leftovers are
    pruned; a healthy one stays across several TTLs."""
    reg = make_registry(lease_ttl_s=1.0)
    healthy = reg.start_heartbeat(_info("d0"), interval_s=0.1, load_fn=_load)
    dying = reg.start_heartbeat(_info("d1"), interval_s=0.1, load_fn=lambda: _load(free=5))
    reg.publish_blocks("d1", PrefixOp.ADD, [11, 12])
    reader = reg.prefix_events()
    reader.sync()

    dying.stop(deregister=False)  # the process "dies": no more beats, lease left behind
    last_beat = dying.last_success
    assert last_beat is not None
    assert [i.instance_id for i in reg.live_instances()] == ["d0", "d1"]

    _wait_until(lambda: [i.instance_id for i in reg.live_instances()] == ["d0"], timeout_s=2.0)
    gone_after = time.monotonic() - last_beat
    assert gone_after <= 1.0 + 0.25, f"left after {gone_after:.2f}s with a 1s TTL"

    assert set(reg.loads()) == {"d0"}
    assert reg.prefix_index.blocks("d1") == frozenset()
    events = reader.poll()
    assert [(e.instance_id, e.op) for e in events] == [("d1", PrefixOp.CLEAR)]

    time.sleep(0.6)  # d0 has now lived well past one TTL on heartbeats alone
    assert [i.instance_id for i in reg.live_instances()] == ["d0"]
    assert healthy.consecutive_failures == 0
    healthy.stop()
    assert not healthy.running
    assert_clean(reg)


def test_heartbeat_reports_load(registry: Registry, assert_clean: Clean) -> None:
    reports = iter([_load(free=50), _load(free=40)] + [_load(free=30)] * 1000)
    with registry.start_heartbeat(_info("d0"), interval_s=0.05, load_fn=lambda: next(reports)):
        assert registry.loads()["d0"].free_kv_blocks == 50  # written by start()
        _wait_until(lambda: registry.loads()["d0"].free_kv_blocks == 30, timeout_s=2.0)
    assert_clean(registry)


def test_report_load_round_trip(
    registry: Registry, redis_client: redis.Redis, assert_clean: Clean
) -> None:
    registry.register(_info("d0"))
    registry.register(_info("d1"))
    report = LoadReport(
        queued_prefill_tokens=1234, running_seqs=7, free_kv_blocks=3, total_kv_blocks=8, ts=12.5
    )
    registry.report_load("d0", report)
    assert registry.loads() == {"d0": report}
    assert registry.loads(["d1"]) == {}
    assert 0 < redis_client.pttl(registry.keys.load("d0")) <= registry.lease_ttl_s * 1000
    registry.deregister("d0")
    registry.deregister("d1")
    assert_clean(registry)


def test_lost_lease_is_reregistered(
    registry: Registry, redis_client: redis.Redis, assert_clean: Clean
) -> None:
    """A lease that expired under a live instance (a long pause) comes back on the next
    beat, and the owner is told so it can republish its blocks."""
    called = threading.Event()
    hb = registry.start_heartbeat(_info("d0"), interval_s=0.05, on_reregistered=called.set)
    assert not called.is_set()
    redis_client.delete(registry.keys.instance("d0"))
    assert called.wait(timeout=2.0)
    assert [i.instance_id for i in registry.live_instances()] == ["d0"]
    hb.stop()
    assert_clean(registry)


def test_heartbeat_rides_out_a_redis_outage() -> None:
    """Redis goes away: beats fail with bounded waits and the thread keeps going; Redis
    comes back on the same port: the instance is registered again."""
    server = RedisServer().start()
    port = server.port
    client = connect(server.url, socket_timeout_s=0.3, retries=0)
    reg = Registry(client, "outage", lease_ttl_s=1.0)
    back = threading.Event()
    hb = reg.start_heartbeat(_info("d0"), interval_s=0.05, on_reregistered=back.set)
    try:
        server.stop()
        _wait_until(lambda: hb.consecutive_failures >= 2, timeout_s=3.0)
        assert hb.running
        with RedisServer(port=port, password=server.password) as again:
            assert back.wait(timeout=3.0)
            assert hb.consecutive_failures == 0
            assert [i.instance_id for i in reg.live_instances()] == ["d0"]
            t0 = time.monotonic()
            hb.stop()
            assert time.monotonic() - t0 < 2.0
            assert reg.namespace_keys() <= {reg.keys.prefix_events}
            assert again.running
    finally:
        hb.stop(deregister=False)
        server.stop()
        client.close()


def test_clusters_are_isolated(make_registry: Callable[..., Registry], assert_clean: Clean) -> None:
    a, b = make_registry(), make_registry()
    a.register(_info("d0"))
    a.report_load("d0", _load())
    a.publish_blocks("d0", PrefixOp.ADD, [1, 2, 3])
    assert b.live_instances() == [] and b.loads() == {} and b.overlap([1, 2]) == {}
    assert b.namespace_keys() == set()
    ns = f"pdserve:{a.cluster}:"
    expected = {"instances", "instance:d0", "load:d0", "prefix:d0", "prefix-events"}
    assert a.namespace_keys() == {ns + k for k in expected}
    assert a.purge() == len(expected)
    assert_clean(a)
    assert_clean(b)


def test_malformed_lease_is_skipped(
    registry: Registry, redis_client: redis.Redis, assert_clean: Clean
) -> None:
    registry.register(_info("d0"))
    redis_client.set(registry.keys.instance("bad"), '{"instance_id": 3}', px=10_000)
    redis_client.sadd(registry.keys.instances, "bad")
    assert [i.instance_id for i in registry.live_instances()] == ["d0"]
    registry.deregister("bad")
    registry.deregister("d0")
    assert_clean(registry)


def test_values_are_validated() -> None:
    with pytest.raises(ValidationError, match="instance_id"):
        InstanceInfo(instance_id="a:b", pool="decode", role=Role.DECODE)
    with pytest.raises(ValidationError, match="tp"):
        InstanceInfo(instance_id="a", pool="decode", role=Role.DECODE, tp=0)
    with pytest.raises(ValidationError, match="exceeds total_kv_blocks"):
        LoadReport(queued_prefill_tokens=0, running_seqs=0, free_kv_blocks=9, total_kv_blocks=8)
    with pytest.raises(ValidationError, match="running_seqs"):
        LoadReport(queued_prefill_tokens=0, running_seqs=-1, free_kv_blocks=0, total_kv_blocks=0)
    with pytest.raises(ValueError, match="cluster name"):
        Keyspace("a*b")
    assert new_instance_id("decode").startswith("decode-")
    assert new_instance_id("decode") != new_instance_id("decode")


def test_registry_refuses_bad_settings(redis_client: redis.Redis) -> None:
    with pytest.raises(ValueError, match="lease_ttl_s"):
        Registry(redis_client, "x", lease_ttl_s=0)
    reg = Registry(redis_client, "x", lease_ttl_s=1.0)
    with pytest.raises(ValueError, match="shorter than the lease TTL"):
        reg.start_heartbeat(_info("d0"), interval_s=1.0)
    assert reg.namespace_keys() == set()
