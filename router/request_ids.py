"""The request id of each call: the client's, when well-formed, else a new one.

HTTP: a well-formed `x-request-id` on the request becomes the id (Serve's HTTP proxy
adds one of its own when the client sent none, and echoes it on the reply); when the
router chose the id, the reply's headers carry it. gRPC: a well-formed `x-request-id` in
the call's metadata, else a new id, returned in the trailing metadata. Either way the
id is bound to the handler task's log records. Well-formed: 1-128 of `A-Za-z0-9._:-`,
starting with a letter or digit (it goes into log lines and headers).
"""

from __future__ import annotations

import uuid
from typing import Any

from fastapi import Request

from telemetry import valid_request_id
from telemetry.context import REQUEST_ID


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def bind_request_id(rid: str) -> None:
    """Tag the log records of the calling task (a front end's handler) with `rid`."""
    REQUEST_ID.set(rid)


class RequestId:
    """The request's id: the `x-request-id` it came with when well-formed, else a new
    one, which the reply's `headers` carry (a proxy echoes the one it passed in)."""

    def __init__(self, request: Request) -> None:
        given = request.headers.get("x-request-id")
        chosen = not valid_request_id(given)
        self.value = new_request_id() if chosen or given is None else given
        self.headers = {"x-request-id": self.value} if chosen else {}
        bind_request_id(self.value)


def grpc_metadata(context: Any, name: str) -> str | None:
    if context is None:
        return None
    found = None
    for key, value in context.invocation_metadata():
        if key.lower() == name:
            found = value
    return found


def grpc_request_id(context: Any) -> str:
    """The call's well-formed `x-request-id`, else a new id; returned to the client in
    the trailing metadata and bound to this task's log records."""
    given = grpc_metadata(context, "x-request-id")
    rid = given if given is not None and valid_request_id(given) else new_request_id()
    bind_request_id(rid)
    if context is not None:
        context.set_trailing_metadata([("x-request-id", rid)])
    return rid
