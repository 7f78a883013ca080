"""A refused request is one WARNING line with its request id, never an ERROR with a
traceback, and the client gets the refusal in its protocol's shape: an OpenAI error
body with the id in `x-request-id`, or a gRPC status set on the call (and Serve's own
traceback of the raised status error filtered out)."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

import grpc
import pytest
from asgi_call import call
from ray.serve.exceptions import gRPCStatusError
from router_core import CallContext, UnreachablePool, core_settings

from protos.pdserve.v1 import pdserve_pb2
from router.core import RouterCore
from router.errors import GrpcStatusError
from router.grpc_api import GrpcFrontend, QuietStatusErrors
from router.openai_app import OpenAIApp


def _router_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name.startswith("router")]


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("/v1/completions", b'{"prompt": "a", "top_p": 7}', 400),
        ("/v1/completions", b'{"prompt": "a", "wat": 1}', 400),
        ("/v1/completions", b"not json", 400),
        ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}]}', 503),
    ],
)
def test_a_refused_http_request_is_one_warning_with_its_id(
    router_core: RouterCore,
    caplog: pytest.LogCaptureFixture,
    path: str,
    body: bytes,
    status: int,
) -> None:
    app = OpenAIApp(router_core).build()
    caplog.set_level(logging.INFO)
    reply = asyncio.run(call(app, "POST", path, body))
    assert reply.status == status
    assert set(reply.json()) == {"error"}
    assert set(reply.json()["error"]) == {"message", "type", "param", "code"}
    rid = reply.headers["x-request-id"]
    records = _router_records(caplog)
    assert [r.levelno for r in records] == [logging.WARNING], records
    assert rid in records[0].getMessage() and records[0].exc_info is None


def test_a_refused_grpc_request_sets_the_status_and_logs_one_warning(
    router_core: RouterCore, caplog: pytest.LogCaptureFixture
) -> None:
    frontend = GrpcFrontend(router_core)
    caplog.set_level(logging.INFO)

    async def run(request: pdserve_pb2.GenerateRequest) -> tuple[CallContext, list[Any]]:
        context = CallContext()
        out: list[Any] = []
        with pytest.raises(GrpcStatusError):
            out.extend([msg async for msg in frontend.generate(request, context)])
        return context, out

    bad = pdserve_pb2.GenerateRequest(prompt="a")
    bad.sampling.top_p = 9.0
    context, out = asyncio.run(run(bad))
    assert out == [] and context.code is grpc.StatusCode.INVALID_ARGUMENT
    assert context.details.startswith("sampling.top_p: ")
    huge = pdserve_pb2.GenerateRequest(prompt="x" * (1 << 20))
    context, out = asyncio.run(run(huge))
    assert out == [] and context.code is grpc.StatusCode.INVALID_ARGUMENT
    assert context.details.startswith("prompt: ")
    records = _router_records(caplog)
    assert [r.levelno for r in records] == [logging.WARNING] * 2, records
    assert all("req-" in r.getMessage() and r.exc_info is None for r in records)
    assert router_core.admission.inflight == 0


def test_a_wrong_grpc_token_is_unauthenticated_without_a_traceback(
    tiny_model_dir: Any, redis_server: Any, caplog: pytest.LogCaptureFixture
) -> None:
    settings = core_settings(tiny_model_dir, redis_server.url, grpc_bearer_token="s3cret")
    core = RouterCore(settings, UnreachablePool(), None)
    frontend = GrpcFrontend(core)
    caplog.set_level(logging.INFO)

    async def run() -> CallContext:
        context = CallContext((("authorization", "Bearer wrong"),))
        with pytest.raises(GrpcStatusError):
            [m async for m in frontend.generate(pdserve_pb2.GenerateRequest(prompt="a"), context)]
        await core.stop()
        return context

    context = asyncio.run(run())
    assert context.code is grpc.StatusCode.UNAUTHENTICATED
    records = _router_records(caplog)
    assert [r.levelno for r in records] == [logging.WARNING] and "s3cret" not in json.dumps(
        [r.getMessage() for r in records]
    )


def test_serve_s_traceback_of_a_status_error_is_filtered() -> None:
    quiet = QuietStatusErrors()

    def record(exc: BaseException) -> logging.LogRecord:
        try:
            raise exc
        except BaseException:
            import sys

            info = sys.exc_info()
        return logging.LogRecord("ray.serve", logging.ERROR, "", 0, "Request failed.", (), info)

    assert not quiet.filter(record(GrpcStatusError("sampling.top_p: bad")))
    ours = GrpcStatusError("sampling.top_p: bad")
    wrapped = gRPCStatusError(ours, grpc.StatusCode.INVALID_ARGUMENT, "sampling.top_p: bad")
    wrapped.__cause__ = ours  # as Serve's replica raises it: `raise wrapped from e`
    assert not quiet.filter(record(wrapped))
    assert quiet.filter(record(RuntimeError("a real bug")))
    assert quiet.filter(logging.LogRecord("ray.serve", logging.INFO, "", 0, "hi", (), None))


def test_http_errors_before_parsing_are_in_openai_s_shape(
    tiny_model_dir: Any, redis_server: Any
) -> None:
    settings = core_settings(
        tiny_model_dir, redis_server.url, http_api_key="k3y", max_request_bytes=1000
    )
    core = RouterCore(settings, UnreachablePool(), None)
    app = OpenAIApp(core).build()
    auth = {"authorization": "Bearer k3y"}

    async def run() -> None:
        for path, method, headers, body, status, kind in [
            ("/v1/completions", "POST", {}, b'{"prompt": "a"}', 401, "unauthenticated"),
            ("/v1/models", "GET", {"authorization": "Bearer no"}, b"", 401, "unauthenticated"),
            ("/openapi.json", "GET", {}, b"", 401, "unauthenticated"),
            ("/v1/completions", "POST", auth, b'{"prompt": "' + b"x" * 2000 + b'"}', 413,
             "invalid_argument"),
            ("/v1/completions", "POST", auth, b'{"prompt": "a"}', 503, "unavailable"),
        ]:  # fmt: skip
            reply = await call(app, method, path, body, headers)
            assert reply.status == status, (path, reply.body)
            error = reply.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["type"] == kind
        assert (await call(app, "GET", "/openapi.json", b"", auth)).status == 200
        await core.stop()

    asyncio.run(run())
    assert core.admission.inflight == 0


@pytest.mark.parametrize(
    ("given", "kept"),
    [("client-id-7", True), ("two words", False), ("x" * 200, False), (None, False)],
)
def test_a_well_formed_client_request_id_is_the_request_s_id(
    router_core: RouterCore, caplog: pytest.LogCaptureFixture, given: str | None, kept: bool
) -> None:
    """A kept id is echoed by Serve's proxy (not by the app); a new one is in the reply."""
    app = OpenAIApp(router_core).build()
    caplog.set_level(logging.INFO)
    headers = {"x-request-id": given} if given is not None else {}
    body = b'{"messages": [{"role": "user", "content": "hi"}]}'
    reply = asyncio.run(call(app, "POST", "/v1/chat/completions", body, headers))
    assert reply.status == 503
    records = _router_records(caplog)
    assert [r.levelno for r in records] == [logging.WARNING], records
    if kept:
        assert "x-request-id" not in reply.headers
        assert given is not None and given in records[0].getMessage()
    else:
        rid = reply.headers["x-request-id"]
        assert rid.startswith("req-") and rid in records[0].getMessage()


def test_grpc_takes_the_client_s_request_id_and_returns_it(router_core: RouterCore) -> None:
    frontend = GrpcFrontend(router_core)

    async def run(metadata: tuple[tuple[str, str], ...]) -> CallContext:
        context = CallContext(metadata)
        with pytest.raises(GrpcStatusError):  # no pool answers: UNAVAILABLE
            [m async for m in frontend.generate(pdserve_pb2.GenerateRequest(prompt="a"), context)]
        return context

    context = asyncio.run(run((("x-request-id", "grpc-client-1"),)))
    assert context.trailing == [("x-request-id", "grpc-client-1")]
    context = asyncio.run(run((("x-request-id", "bad id"),)))
    [(key, rid)] = context.trailing
    assert key == "x-request-id" and rid.startswith("req-")
