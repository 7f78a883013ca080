"""Fixtures for cluster tests: one real redis-server per session, a client per test."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

from cluster.redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real `redis-server` on a free loopback port, stopped after the session."""
    with RedisServer(password="pdserve-test") as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_server.url, socket_timeout=2.0)
    yield client
    client.close()
