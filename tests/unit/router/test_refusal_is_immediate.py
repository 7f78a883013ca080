"""A request past the admission bound is refused before it waits on anything, so an
overload's refusals cost no queue time in the router: over HTTP before its body is read
(on Serve's HTTP proxy the body is a call back into the proxy, queued behind every
other arrival), over gRPC in the call's first step, without ever suspending. Checked
by what the refusal touches, not by a clock; the slots taken to fill the router are
given back and each test ends with none held."""

from __future__ import annotations

import asyncio
import contextvars
import json
from typing import Any

import grpc
import pytest
from router_core import CallContext

from protos.pdserve.v1 import pdserve_pb2
from router.core import RouterCore
from router.errors import GrpcStatusError
from router.grpc_api import GrpcFrontend
from router.openai_app import OpenAIApp

BODY = json.dumps({"prompt": "hello", "max_tokens": 2, "stream": True}).encode()


def _fill(core: RouterCore) -> int:
    n = core.admission.max_inflight - core.admission.inflight
    for i in range(n):
        core.admit(f"filler-{i}", "http")
    assert core.admission.inflight == core.admission.max_inflight
    return n


def _empty(core: RouterCore, n: int) -> None:
    for _ in range(n):
        core.reject("http", "cancelled")


async def _asgi(app: Any, body: bytes, reads: list[str], hang: bool = False) -> dict[str, Any]:
    """POST /v1/completions; `reads` records each read of the body. With `hang`, the
    body never comes (the client stalls), and the call is cancelled after a while."""

    async def receive() -> dict[str, Any]:
        reads.append("receive")
        if hang:
            await asyncio.Event().wait()
        return {"type": "http.request", "body": body, "more_body": False}

    reply: dict[str, Any] = {"status": 0, "body": b""}

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            reply["status"] = message["status"]
        elif message["type"] == "http.response.body":
            reply["body"] += message.get("body", b"")

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/completions",
        "raw_path": b"/v1/completions",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"content-type", b"application/json")],
        "client": ("127.0.0.1", 1),
        "server": ("127.0.0.1", 8000),
    }
    await app(scope, receive, send)
    return reply


def test_a_full_router_refuses_http_before_reading_the_body(router_core: RouterCore) -> None:
    app = OpenAIApp(router_core).build()
    n = _fill(router_core)
    reads: list[str] = []
    try:
        reply = asyncio.run(_asgi(app, BODY, reads))
    finally:
        _empty(router_core, n)
    assert reply["status"] == 429
    assert json.loads(reply["body"])["error"]["type"] == "resource_exhausted"
    assert reads == [], "the body was read for a request refused for capacity"
    refused = router_core.metrics.registry.get_sample_value(
        "pdserve_admissions_total", {"outcome": "refused"}
    )
    assert refused == 1


def test_a_full_router_refuses_grpc_in_the_call_s_first_step(router_core: RouterCore) -> None:
    """Driving the call's coroutine by hand: the first step raises the refusal; it
    never yields to the event loop, so no other task can run before it."""
    frontend = GrpcFrontend(router_core)
    n = _fill(router_core)
    context = CallContext()
    try:
        step = frontend.generate(pdserve_pb2.GenerateRequest(prompt="hello"), context).__anext__()
        with pytest.raises(GrpcStatusError):
            # in a context of its own, as a task would be: the call binds its request id
            contextvars.copy_context().run(step.send, None)
    finally:
        _empty(router_core, n)
    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED


def test_an_admitted_request_gives_its_slot_back_on_every_way_out(
    router_core: RouterCore,
) -> None:
    """A body that never parses, or a client that goes away while sending it: the slot
    taken before the read is given back (the fixture checks none is held)."""
    app = OpenAIApp(router_core).build()
    reads: list[str] = []
    reply = asyncio.run(_asgi(app, b"not json", reads))
    assert reply["status"] == 400 and reads == ["receive"]
    assert router_core.admission.inflight == 0

    async def stalled() -> None:
        call = asyncio.ensure_future(_asgi(app, BODY, reads, hang=True))
        while router_core.admission.inflight == 0:
            await asyncio.sleep(0.001)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call

    asyncio.run(asyncio.wait_for(stalled(), 30.0))
    assert router_core.admission.inflight == 0
