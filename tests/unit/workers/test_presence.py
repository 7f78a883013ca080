"""A worker's registry presence against a real redis-server: lease, load reports,
prefix-block events in order, suspension and recovery, and a clean deregistration."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest

from cluster.redis_server import RedisServer
from engine.block_pool import CacheEvent
from registry import InstanceInfo, LoadReport, Registry, Role, connect
from worker.presence import Presence


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


def _wait(cond: Callable[[], bool], timeout_s: float) -> float:
    start = time.monotonic()
    while not cond():
        assert time.monotonic() - start < timeout_s, "condition not met in time"
        time.sleep(0.02)
    return time.monotonic() - start


def test_presence_lifecycle(redis_url: str) -> None:
    client = connect(redis_url)
    registry = Registry(client, "presence-test", lease_ttl_s=1.0)
    info = InstanceInfo(instance_id="decode-x", pool="decode", role=Role.DECODE, address="x")
    load = LoadReport(queued_prefill_tokens=5, running_seqs=2, free_kv_blocks=7, total_kv_blocks=9)
    presence = Presence(registry, info, lambda: load, interval_s=0.05)
    for event, h in [
        (CacheEvent.ADD, 1),
        (CacheEvent.ADD, 2),
        (CacheEvent.EVICT, 1),
        (CacheEvent.ADD, 3),
    ]:
        presence.on_cache_event(event, h)
    presence.start()
    try:
        assert registry.live_instances() == [info]
        _wait(lambda: registry.prefix_index.blocks("decode-x") == {2, 3}, 2.0)
        report = registry.loads(["decode-x"])["decode-x"]
        assert (report.running_seqs, report.free_kv_blocks) == (2, 7)

        presence.suspend()
        assert not presence.heartbeat_running
        gone = _wait(lambda: not registry.live_instances(), 3.0)
        assert gone <= 1.2  # within one lease TTL (plus polling)
        assert registry.prefix_index.blocks("decode-x") == frozenset()  # pruned with the lease

        presence.resume()
        assert registry.live_instances() == [info]
        _wait(lambda: registry.prefix_index.blocks("decode-x") == {2, 3}, 2.0)  # republished
    finally:
        presence.stop()
        presence.stop()  # idempotent
    assert registry.live_instances() == []
    left = {k for k in registry.namespace_keys() if not k.endswith("prefix-events")}
    assert left == set()
    client.close()
