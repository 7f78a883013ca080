"""What ties one request's work together across processes: its request id (for logs)
and its trace context (for spans).

`TraceContext` is the W3C trace context reduced to what pdserve carries: a 128-bit
trace id, the 64-bit id of the span that is the parent on the other side, and the
sampled flag. It travels in the router <-> pool messages and in the KV transfer's
fixed-layout header, as plain integers (never pickled from the network).

The request id lives in a context variable, `REQUEST_ID`: code on the request path
binds it (`request_scope`) and every log record created while it is bound carries it
(`install_log_records`: as the record's `pdserve_request_id` attribute and, unless the message
already names it, as a `[id] ` prefix of the message, so it shows under any handler's
format). asyncio tasks inherit the binding; threads do not, so work handed to a thread
runs in a copy of the caller's context (`EngineLoop.submit` does this).
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass

REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("pdserve_request_id", default="")
# A client-provided id is used only when it is short and plain: it goes into every log
# line and into response headers.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}")
MAX_TRACE_ID = (1 << 128) - 1
MAX_SPAN_ID = (1 << 64) - 1


def valid_request_id(value: str | None) -> bool:
    """Whether `value` may serve as a request id: 1-128 characters of letters, digits
    and `._:-`, starting with a letter or digit."""
    return value is not None and _REQUEST_ID_RE.fullmatch(value) is not None


@dataclass(frozen=True)
class TraceContext:
    trace_id: int  # 128 bits, nonzero
    span_id: int  # 64 bits, nonzero: the parent span of what the receiver records
    sampled: bool = True

    def __post_init__(self) -> None:
        if not 0 < self.trace_id <= MAX_TRACE_ID:
            raise ValueError(f"trace_id must be a nonzero 128-bit integer, got {self.trace_id}")
        if not 0 < self.span_id <= MAX_SPAN_ID:
            raise ValueError(f"span_id must be a nonzero 64-bit integer, got {self.span_id}")

    @property
    def trace_hex(self) -> str:
        return f"{self.trace_id:032x}"


_TRACEPARENT_RE = re.compile(r"00-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")


def parse_traceparent(value: str | None) -> TraceContext | None:
    """A client's W3C `traceparent` (version 00) as the parent of the request's spans;
    None when absent or malformed (then the router starts a trace of its own)."""
    if not value:
        return None
    m = _TRACEPARENT_RE.fullmatch(value.strip())
    if m is None:
        return None
    trace_id, span_id, flags = int(m[1], 16), int(m[2], 16), int(m[3], 16)
    if trace_id == 0 or span_id == 0:
        return None
    return TraceContext(trace_id, span_id, bool(flags & 1))


@contextlib.contextmanager
def request_scope(request_id: str) -> Iterator[None]:
    """Bind `request_id` for the log records of the block (restored after it)."""
    token = REQUEST_ID.set(request_id)
    try:
        yield
    finally:
        REQUEST_ID.reset(token)


_installed = False


def install_log_records() -> None:
    """Make every log record of this process carry the bound request id (idempotent)."""
    global _installed
    if _installed:
        return
    _installed = True
    base = logging.getLogRecordFactory()

    def factory(*args: object, **kwargs: object) -> logging.LogRecord:
        record = base(*args, **kwargs)
        rid = REQUEST_ID.get()
        record.pdserve_request_id = rid
        if rid and isinstance(record.msg, str) and not _names(record, rid):
            record.msg = f"[{rid}] {record.msg}"
        return record

    logging.setLogRecordFactory(factory)


def _names(record: logging.LogRecord, rid: str) -> bool:
    args = record.args
    if isinstance(args, tuple):
        return rid in args
    return rid in record.msg
