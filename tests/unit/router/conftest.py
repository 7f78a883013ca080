"""The `router_core` fixture: a real RouterCore over a Redis with no instances (see
tests/router_core.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from router_core import UnreachablePool, core_settings

from cluster.redis_server import RedisServer
from router.core import RouterCore


@pytest.fixture
def router_core(tiny_model_dir: Path, redis_server: RedisServer) -> Iterator[RouterCore]:
    core = RouterCore(core_settings(tiny_model_dir, redis_server.url), UnreachablePool(), None)
    yield core
    asyncio.run(core.stop())
    assert core.admission.inflight == 0
