"""The HTTP proxy's middleware that ends an event stream left open by a dead router
replica, driven with inner ASGI apps that behave as Serve's proxy does, wrapped the
way the installed Ray wraps its proxy's app."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from ray.serve._private.http_util import _apply_middlewares, validate_http_proxy_callback_return
from ray.serve._private.utils import call_function_from_import_path

from cluster.builder import serve_process_env
from cluster.config_file import load_config
from router.errors import ErrorKind
from router.sse import DONE, error_event
from router.sse_guard import BROKEN_MESSAGE, CALLBACK_ENV, CALLBACK_PATH, SseGuard

Message = dict[str, Any]
SSE = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"x-request-id", b"r1")]
JSON = [(b"content-type", b"application/json")]
START_SSE: Message = {"type": "http.response.start", "status": 200, "headers": SSE}
BROKEN = error_event(ErrorKind.UNAVAILABLE, BROKEN_MESSAGE, None) + DONE


def _body(data: bytes, more: bool = True) -> Message:
    return {"type": "http.response.body", "body": data, "more_body": more}


def _app(messages: list[Message], then: Exception | None = None) -> Any:
    async def app(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        for m in messages:
            await send(m)
        if then is not None:
            raise then

    return app


def _run(
    app: Any, scope_type: str = "http", sent: list[Message] | None = None
) -> tuple[list[Message], BaseException | None]:
    sent = [] if sent is None else sent

    async def send(m: Message) -> None:
        sent.append(m)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    scope = {"type": scope_type, "path": "/v1/completions", "headers": []}
    try:
        asyncio.run(SseGuard(app)(scope, receive, send))
    except Exception as e:  # what the guard let through
        return sent, e
    return sent, None


def test_a_stream_that_ends_passes_through_untouched() -> None:
    inner = [START_SSE, _body(b"data: {}\n\n"), _body(DONE), _body(b"", more=False)]
    sent, raised = _run(_app(inner))
    assert sent == inner and raised is None
    assert all(a is b for a, b in zip(sent, inner, strict=True))  # the same objects


@pytest.mark.parametrize("then", [RuntimeError("replica died"), None], ids=["raises", "returns"])
def test_a_stream_left_open_ends_with_an_error_event_and_done(then: Exception | None) -> None:
    inner = [START_SSE, _body(b'data: {"a":1}\n\n')]
    sent, raised = _run(_app(inner, then))
    assert raised is None
    assert sent == [*inner, _body(BROKEN, more=False)]
    assert b"".join(m.get("body", b"") for m in sent).endswith(b"\n\ndata: [DONE]\n\n")


def test_a_stream_open_after_its_done_line_only_gets_its_final_message() -> None:
    inner = [START_SSE, _body(b'data: {"a":1}\n\n'), _body(DONE)]
    sent, raised = _run(_app(inner, RuntimeError("replica died")))
    assert raised is None
    assert sent == [*inner, _body(DONE, more=False)]


def test_a_stream_broken_before_its_start_is_left_to_the_proxy() -> None:
    sent, raised = _run(_app([], RuntimeError("no replica")))
    assert sent == [] and isinstance(raised, RuntimeError)


@pytest.mark.parametrize("then", [RuntimeError("replica died"), None], ids=["raises", "returns"])
def test_other_responses_are_untouched(then: Exception | None) -> None:
    inner = [{"type": "http.response.start", "status": 200, "headers": JSON}, _body(b"{")]
    sent, raised = _run(_app(inner, then))
    assert sent == inner
    assert raised is then


def test_a_cancelled_stream_is_not_completed() -> None:
    """The client went away (Serve cancels the handler): nothing more is sent."""

    async def app(scope: Any, receive: Any, send: Callable[[Message], Awaitable[None]]) -> None:
        await send(START_SSE)
        raise asyncio.CancelledError

    sent: list[Message] = []
    with pytest.raises(asyncio.CancelledError):
        _run(app, sent=sent)
    assert sent == [START_SSE]


def test_non_http_scopes_pass_through() -> None:
    inner = [{"type": "websocket.accept"}]
    sent, raised = _run(_app(inner, RuntimeError("x")), scope_type="websocket")
    assert sent == inner and isinstance(raised, RuntimeError)


def test_serve_loads_the_guard_from_the_env_of_every_serve_process() -> None:
    env = serve_process_env(load_config())
    assert env[CALLBACK_ENV] == CALLBACK_PATH
    middlewares = validate_http_proxy_callback_return(call_function_from_import_path(CALLBACK_PATH))
    app = _apply_middlewares(_app([START_SSE], RuntimeError("replica died")), middlewares)
    assert isinstance(app, SseGuard)  # outermost, around Serve's request-id middleware
    sent: list[Message] = []

    async def send(m: Message) -> None:
        sent.append(m)

    async def receive() -> Message:
        return {"type": "http.disconnect"}

    asyncio.run(app({"type": "http", "path": "/", "headers": []}, receive, send))
    assert sent[-1] == _body(BROKEN, more=False)
