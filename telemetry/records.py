"""Finished spans as plain records: what the in-memory trace store keeps and what
`pdserve trace` draws. Encoded as JSON (never pickled)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

Attr = str | int | float | bool


@dataclass(frozen=True)
class SpanRecord:
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_id: str  # 16 hex digits; "" for a root span
    name: str
    service: str  # the process that recorded it: "router", "prefill/<instance>", ...
    start_ns: int  # wall clock (time.time_ns())
    end_ns: int
    attributes: dict[str, Attr] = field(default_factory=dict)
    error: str = ""  # the status description of a span that ended in error

    @property
    def duration_ns(self) -> int:
        return max(0, self.end_ns - self.start_ns)

    def to_json(self) -> str:
        return json.dumps(
            {
                "trace_id": self.trace_id,
                "span_id": self.span_id,
                "parent_id": self.parent_id,
                "name": self.name,
                "service": self.service,
                "start_ns": self.start_ns,
                "end_ns": self.end_ns,
                "attributes": self.attributes,
                "error": self.error,
            },
            separators=(",", ":"),
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> SpanRecord:
        d = json.loads(text)
        if not isinstance(d, dict):
            raise ValueError("a span record is a JSON object")
        attrs = d.get("attributes", {})
        if not isinstance(attrs, dict):
            raise ValueError("a span record's attributes are a JSON object")
        return cls(
            trace_id=_str(d, "trace_id"),
            span_id=_str(d, "span_id"),
            parent_id=_str(d, "parent_id"),
            name=_str(d, "name"),
            service=_str(d, "service"),
            start_ns=_int(d, "start_ns"),
            end_ns=_int(d, "end_ns"),
            attributes={str(k): v for k, v in attrs.items() if isinstance(v, Attr)},
            error=str(d.get("error", "")),
        )


def _str(d: dict[str, Any], key: str) -> str:
    v = d.get(key)
    if not isinstance(v, str):
        raise ValueError(f"span record field {key!r} must be a string")
    return v


def _int(d: dict[str, Any], key: str) -> int:
    v = d.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"span record field {key!r} must be an integer")
    return v
