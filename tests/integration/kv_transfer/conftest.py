"""Fixtures for the multi-process kv_transfer tests: a real redis-server, per-test cluster
names, and spawned instance processes that are always reaped."""

from __future__ import annotations

import multiprocessing as mp
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from cluster.redis_server import RedisServer

# Tests and the spawned children import kvt_workers by name.
sys.path.insert(0, str(Path(__file__).parent))
from kvt_workers import Child, Decode, Setup, Spawn


@pytest.fixture(scope="session")
def redis_url() -> Iterator[str]:
    with RedisServer() as server:
        yield server.url


@pytest.fixture
def cluster_name(request: pytest.FixtureRequest, redis_url: str) -> Iterator[str]:
    """A cluster name of the test's own; its kv keys must be gone when it ends cleanly."""
    name = f"kvt-{re.sub(r'[^A-Za-z0-9_-]', '-', request.node.name)[:60]}-{uuid.uuid4().hex[:6]}"
    yield name
    client = redis.Redis.from_url(redis_url, socket_timeout=5.0)
    client.delete(*client.keys(f"pdserve:{name}:*") or ["-"])
    client.close()


@pytest.fixture
def spawn() -> Iterator[Spawn]:
    """Starts `target(conn, *args)` in a spawned process; kills leftovers at teardown."""
    ctx = mp.get_context("spawn")
    children: list[Child] = []

    def start(target: Callable[..., None], *args: Any, wait_ready: bool = True) -> Child:
        parent, child_end = ctx.Pipe()
        proc = ctx.Process(target=target, args=(child_end, *args), daemon=True)
        proc.start()
        child_end.close()
        child = Child(proc, parent)
        children.append(child)
        if wait_ready:
            assert child.reply(60.0) == ("ready",)
        return child

    yield start
    for child in children:
        child.proc.join(timeout=2.0)
        if child.proc.is_alive():
            child.proc.kill()
            child.proc.join(timeout=5.0)


@pytest.fixture
def make_decode() -> Iterator[Callable[[Setup], Decode]]:
    """Decode instances in this process, closed at teardown even when a test fails."""
    made: list[Decode] = []

    def make(setup: Setup) -> Decode:
        made.append(Decode(setup))
        return made[-1]

    yield make
    for decode in made:
        decode.close()
