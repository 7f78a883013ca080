"""Errors the router reports to clients, by kind; each front end maps the kind to its
protocol (a gRPC status code or an HTTP status).

This module imports nothing but the standard library, and must stay so: Serve's proxy
unpickles the exception a gRPC method raises (`GrpcStatusError`), which imports the
module that defines its class. Importing a heavy module there (torch, through the
rest of the router) would block the proxy's event loop, and every request and health
check it serves, for seconds."""

from __future__ import annotations

from enum import StrEnum


class ErrorKind(StrEnum):
    INVALID_ARGUMENT = "invalid_argument"
    UNAUTHENTICATED = "unauthenticated"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    DEADLINE_EXCEEDED = "deadline_exceeded"
    INTERNAL = "internal"


class RouterError(Exception):
    def __init__(self, kind: ErrorKind, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.field = field


class GrpcStatusError(Exception):
    """Raised by a gRPC method after it set the status code and details on the call's
    context; Serve's proxy reports that status to the client."""


HTTP_STATUS: dict[ErrorKind, int] = {
    ErrorKind.INVALID_ARGUMENT: 400,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.RESOURCE_EXHAUSTED: 429,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.DEADLINE_EXCEEDED: 504,
    ErrorKind.INTERNAL: 500,
}
