"""The server-sent events of the OpenAI-compatible HTTP API: one `data:` line per
event, an error as an `error` event, and `data: [DONE]` at the end of every stream.

This module imports nothing but the standard library and `router.errors`, and must
stay so: Serve's HTTP proxy imports it (through `router.sse_guard`) to end a stream
whose router replica died, and a heavy import there would stall the proxy's loop."""

from __future__ import annotations

import json
from typing import Any

from router.errors import ErrorKind

DONE = b"data: [DONE]\n\n"


def event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def error_event(kind: ErrorKind, message: str, param: str | None) -> bytes:
    return event({"error": {"message": message, "type": kind.value, "param": param}})
