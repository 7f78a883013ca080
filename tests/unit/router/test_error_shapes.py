"""A failure after a request was routed reaches the client in its protocol's shape: a
decode instance whose stream ends before a token gives an OpenAI error body, an SSE
`error` event followed by `data: [DONE]`, or a gRPC status."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from asgi_call import call
from router_core import CallContext, core_settings

from cluster.redis_server import RedisServer
from protos.pdserve.v1 import pdserve_pb2
from router.core import RouterCore
from router.errors import GrpcStatusError
from router.grpc_api import GrpcFrontend
from router.openai_app import OpenAIApp
from router.policy import Candidate, RouteDecision
from router.validation import ValidRequest


class _Ended:
    """A call's result: an empty stream, or None when awaited."""

    def __aiter__(self) -> _Ended:
        return self

    async def __anext__(self) -> Any:
        raise StopAsyncIteration

    def __await__(self) -> Iterator[None]:
        return iter(())

    def cancel(self) -> None:
        pass


class _Method:
    def remote(self, *args: Any, **kwargs: Any) -> _Ended:
        return _Ended()


class EndingPool:
    """Stands for a decode pool whose replica ends every stream before its first item."""

    def options(self, **_: Any) -> EndingPool:
        return self

    def __getattr__(self, name: str) -> _Method:
        return _Method()


@pytest.fixture
def routed_core(tiny_model_dir: Path, redis_server: RedisServer) -> Iterator[RouterCore]:
    core = RouterCore(core_settings(tiny_model_dir, redis_server.url), EndingPool(), None)
    decision = RouteDecision(Candidate("inst-0", "replica-0", 0, 0, None), None, 1)

    def route(req: ValidRequest, avoid: frozenset[str] = frozenset()) -> RouteDecision:
        return decision

    core.route = route  # type: ignore[method-assign]  # the one instance, always
    yield core
    asyncio.run(core.stop())
    assert core.admission.inflight == 0


MSG = [{"role": "user", "content": "hi"}]


def test_openai_errors_after_routing(routed_core: RouterCore) -> None:
    app = OpenAIApp(routed_core).build()

    async def run() -> None:
        whole = await call(app, "POST", "/v1/completions", json.dumps({"prompt": "hi"}).encode())
        assert whole.status == 500
        error = whole.json()["error"]
        assert error["type"] == "internal" and "ended the stream early" in error["message"]
        for path, body in (
            ("/v1/completions", {"prompt": "hi", "stream": True}),
            ("/v1/chat/completions", {"messages": MSG, "stream": True}),
        ):
            reply = await call(app, "POST", path, json.dumps(body).encode())
            assert reply.status == 200 and reply.headers["content-type"].startswith(
                "text/event-stream"
            )
            events = reply.events()
            assert events[-1] == "[DONE]"
            last = json.loads(events[-2])
            assert last["error"]["type"] == "internal"
            assert "ended the stream early" in last["error"]["message"]
            assert all("error" not in json.loads(e) for e in events[:-2])

    asyncio.run(run())


def test_grpc_error_after_routing(routed_core: RouterCore) -> None:
    frontend = GrpcFrontend(routed_core)

    async def run() -> CallContext:
        context = CallContext()
        with pytest.raises(GrpcStatusError):
            [m async for m in frontend.generate(pdserve_pb2.GenerateRequest(prompt="hi"), context)]
        return context

    context = asyncio.run(run())
    assert context.code is grpc.StatusCode.INTERNAL
    assert "ended the stream early" in context.details
