"""Fixtures for tests that need Redis: one real redis-server per session, and per test a client
and a `Registry` on a cluster name of its own, checked clean at the end. And `spans`: this
process's tracing on, every span it exports collected in a list."""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from cluster.redis_server import RedisServer
from registry import Registry, connect
from telemetry import TracingSettings, tracing
from telemetry.records import SpanRecord

RegistryFactory = Callable[..., Registry]


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A real `redis-server` on a free loopback port, stopped after the session."""
    with RedisServer(password="pdserve-test") as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    client = connect(redis_server.url, socket_timeout_s=2.0)
    yield client
    client.close()


def _cluster_name(request: pytest.FixtureRequest) -> str:
    base = re.sub(r"[^A-Za-z0-9_-]", "-", request.node.name)[:80]
    return f"t-{base}-{uuid.uuid4().hex[:6]}"


@pytest.fixture
def make_registry(
    request: pytest.FixtureRequest, redis_client: redis.Redis
) -> Iterator[RegistryFactory]:
    """Builds registries on fresh cluster names; their keys are purged afterwards."""
    made: list[Registry] = []

    def make(**kwargs: object) -> Registry:
        reg = Registry(redis_client, _cluster_name(request), **kwargs)  # type: ignore[arg-type]
        assert reg.namespace_keys() == set()
        made.append(reg)
        return reg

    yield make
    for reg in made:
        reg.purge()


@pytest.fixture
def registry(make_registry: RegistryFactory) -> Registry:
    return make_registry()


def assert_registry_clean(reg: Registry) -> None:
    """Back to baseline: no leases, loads, prefix sets or index entries. Only the event
    stream (history, capped) may remain."""
    assert reg.live_instances() == []
    assert reg.loads() == {}
    assert reg.namespace_keys() <= {reg.keys.prefix_events}


@pytest.fixture
def assert_clean() -> Callable[[Registry], None]:
    return assert_registry_clean


@pytest.fixture
def spans() -> Iterator[list[SpanRecord]]:
    got: list[SpanRecord] = []
    assert tracing.configure(TracingSettings(enabled=True, export_delay_s=0.05), "t", got.extend)
    yield got
    tracing.shutdown()
