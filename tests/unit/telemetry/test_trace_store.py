"""The tracer's export into the cluster's trace store on a real Redis: one request's
spans come back by request id, the store keeps only the last N requests, and spans of
an unsampled request are never recorded."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import pytest
import redis

from registry.traces import TraceStore, TraceStoreLimits, is_trace_key, start_tracing
from telemetry import TraceContext, TracingSettings, tracing


@pytest.fixture
def cluster() -> str:
    return f"t-traces-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def store(redis_client: redis.Redis, cluster: str) -> Iterator[TraceStore]:
    s = TraceStore(redis_client, cluster, TraceStoreLimits(max_requests=3, max_spans=5))
    yield s
    s.clear()
    tracing.shutdown()
    assert not [k for k in redis_client.scan_iter(f"pdserve:{cluster}:*")]


def _request(rid: str, children: int = 2) -> None:
    root = tracing.start("request", None, {"pdserve.request_id": rid})
    ctx = tracing.context_of(root)
    for i in range(children):
        with tracing.span("child", ctx, {"layer": i}):
            pass
    root.end()


def _on(redis_client: redis.Redis, cluster: str, **kw: float) -> None:
    settings = TracingSettings(
        enabled=True, max_requests=3, max_spans_per_request=5, export_delay_s=0.05, **kw
    )
    assert start_tracing(settings, redis_client, cluster, "unit")


def test_a_request_s_spans_come_back_by_its_id(
    redis_client: redis.Redis, cluster: str, store: TraceStore
) -> None:
    _on(redis_client, cluster)
    _request("req-a", children=2)
    assert tracing.flush()
    spans = store.spans("req-a")
    assert sorted(s.name for s in spans) == ["child", "child", "request"]
    assert {s.service for s in spans} == {"unit"} and len({s.trace_id for s in spans}) == 1
    root = next(s for s in spans if s.name == "request")
    assert all(s.parent_id == root.span_id for s in spans if s.name == "child")
    assert store.spans(root.trace_id) == spans  # by trace id too
    assert store.spans("req-unknown") == []
    keys = list(redis_client.scan_iter(f"pdserve:{cluster}:*"))
    assert keys and all(is_trace_key(k) for k in keys)


def test_the_store_keeps_the_last_requests_and_caps_spans(
    redis_client: redis.Redis, cluster: str, store: TraceStore
) -> None:
    _on(redis_client, cluster)
    for i in range(5):
        _request(f"req-{i}", children=10)
        assert tracing.flush()
    assert [rid for rid, _ in store.recent()] == ["req-4", "req-3", "req-2"]
    assert store.spans("req-0") == [] and store.spans("req-1") == []
    assert len(store.spans("req-4")) == 5  # capped at max_spans
    n_traces = sum(1 for k in redis_client.scan_iter(f"pdserve:{cluster}:trace:*"))
    assert n_traces == 3


def test_unsampled_requests_record_nothing(
    redis_client: redis.Redis, cluster: str, store: TraceStore
) -> None:
    _on(redis_client, cluster, sample_ratio=0.0)
    _request("req-x")
    assert tracing.flush()
    assert store.spans("req-x") == []
    root = tracing.start("request")
    assert tracing.context_of(root) is not None and not root.is_recording()


def test_tracing_off_is_a_no_op() -> None:
    assert not tracing.configure(TracingSettings(enabled=False), "unit")
    s = tracing.start("request")
    assert tracing.context_of(s) is None
    tracing.record("x", None, 0, 1)


def test_a_request_under_a_client_s_trace_is_indexed_and_evicted(
    redis_client: redis.Redis, cluster: str, store: TraceStore
) -> None:
    _on(redis_client, cluster)
    for i in range(4):
        client_span = TraceContext(0xC0FFEE + i, 0xBEEF, True)
        root = tracing.start("request", client_span, {"pdserve.request_id": f"req-c{i}"})
        root.end()
        assert tracing.flush()
    assert [rid for rid, _ in store.recent()] == ["req-c3", "req-c2", "req-c1"]
    assert store.spans("req-c0") == [] and store.spans(f"{0xC0FFEE:032x}") == []
    [span] = store.spans("req-c3")
    assert span.trace_id == f"{0xC0FFEE + 3:032x}" and span.parent_id == f"{0xBEEF:016x}"
