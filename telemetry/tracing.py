"""This process's tracer: OpenTelemetry spans, exported to an OTLP collector or, without
one, handed as `SpanRecord`s to a sink (the cluster's bounded trace store).

Lifecycle: each process on the request path (router replica, pool replica, rank actor)
calls `configure(settings, service, sink)` once when it starts and `shutdown()` when it
stops. Until then, and with tracing off, every helper here is a no-op that costs one
attribute check. Spans are batched and exported on the SDK's own thread, never on the
request path.

Sampling is decided once per request, at the router (`sample_ratio`); every other
process follows the sampled flag that the `TraceContext` carries.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, Status, StatusCode, TraceFlags

from telemetry.context import TraceContext
from telemetry.records import Attr, SpanRecord

logger = logging.getLogger(__name__)

Sink = Callable[[list[SpanRecord]], None]


@dataclass(frozen=True)
class TracingSettings:
    """Resolved from the cluster config's `tracing` section by the builder."""

    enabled: bool = False
    sample_ratio: float = 1.0
    otlp_endpoint: str | None = None  # e.g. http://collector:4318/v1/traces
    max_requests: int = 256  # the in-memory store keeps the last N requests' spans
    max_spans_per_request: int = 2048
    retention_s: float = 3600.0  # a trace's spans expire from the store after this
    export_delay_s: float = 0.5  # the batch exporter's flush interval

    def __post_init__(self) -> None:
        if not 0.0 <= self.sample_ratio <= 1.0:
            raise ValueError(f"sample_ratio must be in [0, 1], got {self.sample_ratio}")


class _State:
    provider: TracerProvider | None = None
    tracer: trace.Tracer | None = None


_state = _State()


def configure(settings: TracingSettings, service: str, sink: Sink | None = None) -> bool:
    """Start this process's tracer (replacing an earlier one); whether tracing is on.
    Spans go to `settings.otlp_endpoint` when set, else to `sink`."""
    shutdown()
    if not settings.enabled:
        return False
    exporter: SpanExporter
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
    elif sink is not None:
        exporter = RecordExporter(sink)
    else:
        raise ValueError("tracing needs an OTLP endpoint or a sink for its spans")
    provider = TracerProvider(
        resource=Resource.create({"service.name": service}),
        sampler=ParentBased(TraceIdRatioBased(settings.sample_ratio)),
    )
    provider.add_span_processor(
        BatchSpanProcessor(exporter, schedule_delay_millis=settings.export_delay_s * 1000)
    )
    _state.provider = provider
    _state.tracer = provider.get_tracer("pdserve")
    return True


def shutdown() -> None:
    """Flush and stop this process's tracer (bounded by the SDK's export timeout)."""
    provider, _state.provider, _state.tracer = _state.provider, None, None
    if provider is not None:
        provider.shutdown()


def flush(timeout_s: float = 5.0) -> bool:
    provider = _state.provider
    return provider.force_flush(int(timeout_s * 1000)) if provider is not None else True


def enabled() -> bool:
    return _state.tracer is not None


def _parent(ctx: TraceContext | Span | None) -> otel_context.Context | None:
    if ctx is None:
        return None
    if isinstance(ctx, TraceContext):
        flags = TraceFlags(TraceFlags.SAMPLED if ctx.sampled else TraceFlags.DEFAULT)
        ctx = NonRecordingSpan(SpanContext(ctx.trace_id, ctx.span_id, True, flags))
    return trace.set_span_in_context(ctx)


def start(
    name: str,
    parent: TraceContext | Span | None = None,
    attributes: Mapping[str, Attr] | None = None,
    start_ns: int | None = None,
) -> Span:
    """A started span under `parent` (a new trace when None); end it with `end`. With
    tracing off, the invalid span (its methods do nothing)."""
    tracer = _state.tracer
    if tracer is None:
        return trace.INVALID_SPAN
    return tracer.start_span(name, _parent(parent), attributes=attributes, start_time=start_ns)


def end(span: Span, error: str = "", end_ns: int | None = None) -> None:
    if error:
        mark_error(span, error)
    span.end(end_ns)


def mark_error(span: Span, message: str) -> None:
    span.set_status(Status(StatusCode.ERROR, message))


def record(
    name: str,
    parent: TraceContext | Span | None,
    start_ns: int,
    end_ns: int,
    attributes: Mapping[str, Attr] | None = None,
) -> None:
    """A span that already happened, from its two timestamps."""
    if _state.tracer is not None and parent is not None:
        start(name, parent, attributes, start_ns).end(end_ns)


@contextmanager
def span(
    name: str,
    parent: TraceContext | Span | None = None,
    attributes: Mapping[str, Attr] | None = None,
) -> Iterator[Span]:
    """A span around the block; an exception leaving it marks the span as an error."""
    s = start(name, parent, attributes)
    try:
        yield s
    except BaseException as e:
        end(s, f"{type(e).__name__}: {e}")
        raise
    end(s)


def context_of(span: Span) -> TraceContext | None:
    """The context a child in another process takes: None for the invalid span."""
    sc = span.get_span_context()
    if not sc.is_valid:
        return None
    return TraceContext(sc.trace_id, sc.span_id, sc.trace_flags.sampled)


def now_ns() -> int:
    return time.time_ns()


class RecordExporter(SpanExporter):
    """Hands finished spans to a sink as `SpanRecord`s (on the SDK's export thread)."""

    def __init__(self, sink: Sink) -> None:
        self._sink = sink
        self._failures = 0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        records = [to_record(s) for s in spans]
        try:
            self._sink(records)
        except Exception as e:
            self._failures += 1
            if self._failures in (1, 10) or self._failures % 1000 == 0:
                logger.warning("trace export failed (%d times): %s", self._failures, e)
            return SpanExportResult.FAILURE
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def to_record(s: ReadableSpan) -> SpanRecord:
    ctx = s.context
    assert ctx is not None
    service = s.resource.attributes.get("service.name", "")
    status = s.status
    return SpanRecord(
        trace_id=f"{ctx.trace_id:032x}",
        span_id=f"{ctx.span_id:016x}",
        parent_id=f"{s.parent.span_id:016x}" if s.parent is not None else "",
        name=s.name,
        service=str(service),
        start_ns=s.start_time or 0,
        end_ns=s.end_time or 0,
        attributes={k: v for k, v in (s.attributes or {}).items() if isinstance(v, Attr)},
        error=(status.description or "error") if status.status_code is StatusCode.ERROR else "",
    )
