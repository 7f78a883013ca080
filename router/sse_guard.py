"""An ASGI middleware on Serve's HTTP proxy that ends every server-sent-event stream
properly, even when the router replica that produced it died mid-stream.

Serve's proxy, when a replica fails after the response started, returns without
the final body message, and the HTTP server then cuts the client's connection. This
middleware sits outside the proxy's app and watches, per request, only the messages
it passes on: a response with `content-type: text/event-stream` that the inner app
leaves open (it returns, or raises, after `http.response.start` and before the body
message with `more_body` false) is completed here with an `error` event of kind
`unavailable` and `data: [DONE]` (or with `data: [DONE]` alone if the stream had
already sent it), the same ending the router itself gives an error after the
stream started. Every message is passed on as it comes, unbuffered; any other
response, and a request the client abandoned (cancellation), is left alone.

Serve loads it from `RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`, which names
`proxy_middlewares` (`cluster.builder.serve_process_env` sets it for every Serve
process), in the proxy's own process: so this module imports only starlette (which
the proxy already runs on) and the router's standard-library-only modules."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from starlette.middleware import Middleware

from router.errors import ErrorKind
from router.sse import DONE, error_event

logger = logging.getLogger(__name__)

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK_PATH = "router.sse_guard.proxy_middlewares"
BROKEN_MESSAGE = "the stream broke: the router serving it went away; retry the request"

Message = MutableMapping[str, Any]
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

_SSE = b"text/event-stream"


def proxy_middlewares() -> list[Middleware]:
    """Serve's HTTP proxy callback: the middlewares to wrap the proxy's app with."""
    return [Middleware(SseGuard)]


def _is_sse(start: Message) -> bool:
    for name, value in start.get("headers", ()):
        if name.lower() == b"content-type":
            return bool(value.split(b";", 1)[0].strip().lower() == _SSE)
    return False


class _Watch:
    """What the inner app has sent of one response: the `send` it is given."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.sse = False  # an SSE response has started and not ended
        self.done_sent = False  # its last body chunk ended with `data: [DONE]`

    async def __call__(self, message: Message) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.sse = _is_sse(message) and not message.get("trailers", False)
        elif kind == "http.response.body" and self.sse:
            if not message.get("more_body", False):
                self.sse = False
            elif body := message.get("body", b""):
                self.done_sent = bytes(body).endswith(DONE)
        await self._send(message)

    async def finish(self, path: str, cause: str) -> None:
        """End the open SSE response: an error event (unless the stream had already
        sent [DONE]) and [DONE], as the response's final body."""
        logger.warning("ending a broken event stream of %s (%s)", path, cause)
        body = DONE
        if not self.done_sent:
            body = error_event(ErrorKind.UNAVAILABLE, BROKEN_MESSAGE, None) + DONE
        self.sse = False
        await self._send({"type": "http.response.body", "body": body, "more_body": False})


class SseGuard:
    """Pure ASGI middleware; see the module docstring."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watch = _Watch(send)
        try:
            await self.app(scope, receive, watch)
        except Exception as e:  # not a cancellation: the client may still be there
            if not watch.sse:
                raise
            await watch.finish(scope.get("path", ""), f"{type(e).__name__}: {e}")
            return
        if watch.sse:
            await watch.finish(scope.get("path", ""), "the app returned mid-stream")
