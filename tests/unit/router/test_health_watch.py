"""The gRPC health Watch needs no token, so it is bounded: a count per router replica
(RESOURCE_EXHAUSTED beyond it) and a lifetime per stream; open watches take no
admission slot from Generate."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2
from router_core import CallContext, UnreachablePool, core_settings

from cluster.redis_server import RedisServer
from protos.pdserve.v1 import pdserve_pb2
from router.core import RouterCore
from router.errors import GrpcStatusError
from router.grpc_api import GrpcFrontend

REQ = health_pb2.HealthCheckRequest(service="")


def test_watches_are_counted_refused_beyond_the_bound_and_end_by_themselves(
    tiny_model_dir: Path, redis_server: RedisServer
) -> None:
    settings = core_settings(
        tiny_model_dir, redis_server.url, max_health_watches=2, health_watch_max_s=1.5
    )
    core = RouterCore(settings, UnreachablePool(), None)
    frontend = GrpcFrontend(core)

    async def run() -> None:
        streams = [frontend.watch(REQ, CallContext()) for _ in range(2)]
        for s in streams:  # each answers the status at once: no decode instance
            first = await asyncio.wait_for(anext(s), 5)
            assert first.status == health_pb2.HealthCheckResponse.NOT_SERVING
        assert frontend.open_watches == 2
        extra = CallContext()
        with pytest.raises(GrpcStatusError):
            [m async for m in frontend.watch(REQ, extra)]
        assert extra.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        # Generate still gets through the core (and finds no instance).
        context = CallContext()
        hello = pdserve_pb2.GenerateRequest(prompt="hi")
        with pytest.raises(GrpcStatusError):
            [m async for m in frontend.generate(hello, context)]
        assert context.code is grpc.StatusCode.UNAVAILABLE
        await streams[0].aclose()  # a client went away: its slot is free again
        assert frontend.open_watches == 1
        again = frontend.watch(REQ, CallContext())
        await asyncio.wait_for(anext(again), 5)
        # Unchanged status: nothing more is sent, and each stream ends at its lifetime.
        for s in (streams[1], again):
            rest: list[Any] = await asyncio.wait_for(_drain(s), 10)
            assert rest == []
        assert frontend.open_watches == 0
        unknown = CallContext()
        bad = health_pb2.HealthCheckRequest(service="nope")
        with pytest.raises(GrpcStatusError):
            [m async for m in frontend.watch(bad, unknown)]
        assert unknown.code is grpc.StatusCode.NOT_FOUND and frontend.open_watches == 0
        await core.stop()

    asyncio.run(run())
    assert core.admission.inflight == 0


async def _drain(stream: Any) -> list[Any]:
    return [m async for m in stream]
