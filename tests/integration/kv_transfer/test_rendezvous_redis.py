"""RedisRendezvous against a real redis-server: namespacing, TTL and ownership."""

from __future__ import annotations

import time

import pytest
import redis

from kv_transfer.rendezvous import Lease, RedisRendezvous


def test_redis_records_are_namespaced_expire_and_withdraw(
    redis_url: str, cluster_name: str
) -> None:
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    store = RedisRendezvous(client, cluster_name)
    store.publish("shm:decode-0:0", "a", ttl_s=0.2)
    assert client.get(f"pdserve:{cluster_name}:kv:shm:decode-0:0") == b"a"
    assert store.lookup("shm:decode-0:0") == "a"
    time.sleep(0.35)
    assert store.lookup("shm:decode-0:0") is None

    lease = Lease(store, "torch_dist:decode-0:1", "b", ttl_s=0.3)
    time.sleep(0.7)
    assert store.lookup("torch_dist:decode-0:1") == "b"
    store.publish("torch_dist:decode-0:1", "c", ttl_s=5)  # someone else's now
    lease.close()
    assert store.lookup("torch_dist:decode-0:1") == "c"
    store.withdraw("torch_dist:decode-0:1", "c")
    assert client.keys(f"pdserve:{cluster_name}:*") == []
    client.close()


def test_cluster_names_cannot_escape_their_namespace() -> None:
    with pytest.raises(ValueError):
        RedisRendezvous(redis.Redis(), "a:b")
