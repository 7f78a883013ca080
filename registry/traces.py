"""The cluster's bounded in-memory trace store, in the cluster's Redis: the spans of the
last N requests, for `pdserve trace` when no OTLP collector is configured.

Every process on the request path (router and pool replicas, rank actors) already holds
an authenticated Redis client and outlives no cluster; so the store needs no process of
its own, keeps a request's spans when the replica that recorded them is replaced, and
the CLI reads it with the URL it already has. Writes come from each process's batch
span exporter thread, one pipelined round trip per batch, never from the request path.

Layout, under `pdserve:<cluster>:`:

    trace:<trace id>     LIST of SpanRecord JSON, at most `max_spans` (the first ones
                         kept), expiring `retention_s` after its last write
    trace-requests       HASH request id -> trace id
    trace-index          LIST of "<request id> <trace id>", oldest first, at most
                         `max_requests`: the oldest beyond it is evicted with its spans

A request enters the index when the router's `request` span (the one that names the
request id; it ends last, and is the root unless the client sent a `traceparent`) is
written. Spans that arrive after their request was evicted expire by TTL.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass

import redis

from registry.keys import Keyspace
from telemetry import tracing
from telemetry.records import SpanRecord
from telemetry.tracing import TracingSettings

logger = logging.getLogger(__name__)

REQUEST_ID_ATTR = "pdserve.request_id"  # set on the router's request span only
_TRACE_ID = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class TraceStoreLimits:
    max_requests: int = 256
    max_spans: int = 2048
    retention_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.max_requests < 1 or self.max_spans < 1 or self.retention_s <= 0:
            raise ValueError(f"trace store limits must be positive: {self}")


def is_trace_key(key: str) -> bool:
    """Whether a key of a cluster's namespace belongs to its trace store (which keeps
    the last requests' spans after they finish, by design)."""
    name = key.split(":", 2)[-1]
    return name.startswith("trace:") or name in ("trace-requests", "trace-index")


class TraceStore:
    def __init__(
        self, client: redis.Redis, cluster: str, limits: TraceStoreLimits | None = None
    ) -> None:
        self._r = client
        self._keys = Keyspace(cluster)
        self.limits = limits or TraceStoreLimits()

    def _trace_key(self, trace_id: str) -> str:
        return f"{self._keys.prefix}trace:{trace_id}"

    @property
    def _requests(self) -> str:
        return f"{self._keys.prefix}trace-requests"

    @property
    def _index(self) -> str:
        return f"{self._keys.prefix}trace-index"

    def add(self, records: Sequence[SpanRecord]) -> None:
        """Store a batch of finished spans (one pipelined round trip, then eviction)."""
        if not records:
            return
        by_trace: dict[str, list[str]] = {}
        roots: list[tuple[str, str]] = []
        for rec in records:
            by_trace.setdefault(rec.trace_id, []).append(rec.to_json())
            rid = rec.attributes.get(REQUEST_ID_ATTR)
            if isinstance(rid, str):  # the router's request span (under a client's, maybe)
                roots.append((rid, rec.trace_id))
        lim = self.limits
        pipe = self._r.pipeline(transaction=False)
        for tid, items in by_trace.items():
            key = self._trace_key(tid)
            pipe.rpush(key, *items)
            pipe.ltrim(key, 0, lim.max_spans - 1)
            pipe.expire(key, max(1, int(lim.retention_s)))
        for rid, tid in roots:
            pipe.hset(self._requests, rid, tid)
            pipe.rpush(self._index, f"{rid} {tid}")
        if roots:
            pipe.llen(self._index)
        replies = pipe.execute()
        if roots:
            self._evict(int(replies[-1]) - lim.max_requests)

    def _evict(self, excess: int) -> None:
        if excess <= 0:
            return
        popped = self._r.lpop(self._index, excess)
        for entry in popped or ():
            rid, _, tid = str(entry).partition(" ")
            self._r.delete(self._trace_key(tid))
            if self._r.hget(self._requests, rid) == tid:  # not reused by a newer request
                self._r.hdel(self._requests, rid)

    def trace_id_of(self, request_id: str) -> str | None:
        """The trace id of a request id, or the argument itself when it is a trace id."""
        tid = self._r.hget(self._requests, request_id)
        if tid is not None:
            return str(tid)
        return request_id if _TRACE_ID.fullmatch(request_id) else None

    def spans(self, request_id: str) -> list[SpanRecord]:
        """The stored spans of a request (by request id or trace id); [] if none."""
        tid = self.trace_id_of(request_id)
        if tid is None:
            return []
        out = []
        for item in self._r.lrange(self._trace_key(tid), 0, -1):
            try:
                out.append(SpanRecord.from_json(item))
            except ValueError as e:
                logger.warning("trace %s: skipping a malformed span: %s", tid, e)
        return out

    def recent(self, n: int = 20) -> list[tuple[str, str]]:
        """The last `n` stored requests as (request id, trace id), newest first."""
        entries = self._r.lrange(self._index, -n, -1)
        out = [tuple(str(e).partition(" ")[::2]) for e in reversed(entries)]
        return [(a, b) for a, b in out]

    def clear(self) -> None:
        """Drop every stored trace (the cluster going down)."""
        for entry in self._r.lrange(self._index, 0, -1):
            self._r.delete(self._trace_key(str(entry).partition(" ")[2]))
        self._r.delete(self._index, self._requests)


def start_tracing(
    settings: TracingSettings, client: redis.Redis, cluster: str, service: str
) -> bool:
    """Configure this process's tracer: to the OTLP endpoint when set, else into the
    cluster's trace store through `client`. Whether tracing is on."""
    limits = TraceStoreLimits(
        settings.max_requests, settings.max_spans_per_request, settings.retention_s
    )
    store = TraceStore(client, cluster, limits)
    return tracing.configure(settings, service, store.add)
