"""This process's tracer: spans recorded into a buffer on the recording thread, and
exported in batches on the recorder's own thread (`telemetry.spans`) to an OTLP
collector or, without one, as `SpanRecord`s to a sink (the cluster's bounded trace
store).

Lifecycle: each process on the request path (router replica, pool replica, rank actor)
calls `configure(settings, service, sink)` once when it starts and `shutdown()` when it
stops. Until then, and with tracing off, every helper here is a no-op that costs one
attribute check. Recording a span costs its thread a few microseconds; building export
objects and serializing happen off the request path.

Sampling is decided once per request, at the router (`sample_ratio`, by the trace id as
OpenTelemetry's ratio sampler does); every other process follows the sampled flag that
the `TraceContext` carries. Spans are OpenTelemetry API spans, so callers hold
`opentelemetry.trace.Span`s and the invalid span when tracing is off.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, Status, StatusCode, TraceFlags

from telemetry.context import TraceContext
from telemetry.records import Attr, SpanRecord
from telemetry.spans import Ended, LiveSpan, Recorder, new_span_id, new_trace_id, sample

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
    recorder: Recorder | None = None
    sample_ratio: float = 1.0


_state = _State()
_BUFFERED_SPANS = 65536  # spans a process holds between two exports


def configure(settings: TracingSettings, service: str, sink: Sink | None = None) -> bool:
    """Start this process's tracer (replacing an earlier one); whether tracing is on.
    Spans go to `settings.otlp_endpoint` when set, else to `sink`."""
    shutdown()
    if not settings.enabled:
        return False
    export: Callable[[list[Ended]], bool]
    close: Callable[[], None] | None = None
    if settings.otlp_endpoint:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        otlp = OTLPSpanExporter(endpoint=settings.otlp_endpoint)
        export, close = _OtlpExport(otlp, service), otlp.shutdown
    elif sink is not None:
        export = _SinkExport(sink, service)
    else:
        raise ValueError("tracing needs an OTLP endpoint or a sink for its spans")
    _state.sample_ratio = settings.sample_ratio
    recorder = Recorder(service, export, settings.export_delay_s, _BUFFERED_SPANS, close)
    _state.recorder = recorder.start()
    return True


def shutdown() -> None:
    """Export what is buffered and stop this process's tracer (bounded)."""
    recorder, _state.recorder = _state.recorder, None
    if recorder is not None:
        recorder.stop()


def flush(timeout_s: float = 5.0) -> bool:
    recorder = _state.recorder
    return recorder.flush(timeout_s) if recorder is not None else True


def enabled() -> bool:
    return _state.recorder is not None


def _parent(ctx: TraceContext | Span | None) -> tuple[int, int, bool] | None:
    """(trace id, parent span id, sampled) of a parent, None for a new trace."""
    if ctx is None:
        return None
    if isinstance(ctx, TraceContext):
        return ctx.trace_id, ctx.span_id, ctx.sampled
    sc = ctx.get_span_context()
    if not sc.is_valid:
        return None
    return sc.trace_id, sc.span_id, sc.trace_flags.sampled


def start(
    name: str,
    parent: TraceContext | Span | None = None,
    attributes: Mapping[str, Attr] | None = None,
    start_ns: int | None = None,
) -> Span:
    """A started span under `parent` (a new trace when None); end it with `end`. With
    tracing off, the invalid span; in a trace not sampled, a span that records nothing
    but carries the trace's context (its methods do nothing)."""
    recorder = _state.recorder
    if recorder is None:
        return trace.INVALID_SPAN
    up = _parent(parent)
    if up is None:
        trace_id, parent_id = new_trace_id(), 0
        sampled = sample(trace_id, _state.sample_ratio)
    else:
        trace_id, parent_id, sampled = up
    if not sampled:
        return NonRecordingSpan(SpanContext(trace_id, new_span_id(), False, TraceFlags(0)))
    begin = start_ns if start_ns is not None else time.time_ns()
    return LiveSpan(recorder, name, trace_id, parent_id, begin, attributes)


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
    """A span that already happened, from its two timestamps (under a sampled parent)."""
    recorder = _state.recorder
    if recorder is None or parent is None:
        return
    up = _parent(parent)
    if up is not None and up[2]:
        recorder.add(Ended(name, up[0], new_span_id(), up[1], start_ns, end_ns, attributes, ""))


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


class _SinkExport:
    """Hands a batch to a sink as `SpanRecord`s (on the recorder's export thread)."""

    def __init__(self, sink: Sink, service: str) -> None:
        self._sink = sink
        self._service = service

    def __call__(self, spans: list[Ended]) -> bool:
        try:
            self._sink([s.to_record(self._service) for s in spans])
        except Exception as e:
            logger.warning("trace export to the store failed: %s", e)
            return False
        return True


class _OtlpExport:
    """Hands a batch to an OpenTelemetry exporter as SDK spans."""

    def __init__(self, exporter: SpanExporter, service: str) -> None:
        self._exporter = exporter
        self._resource = Resource.create({"service.name": service})

    def __call__(self, spans: list[Ended]) -> bool:
        batch: Sequence[ReadableSpan] = [self._readable(s) for s in spans]
        return self._exporter.export(batch) is SpanExportResult.SUCCESS

    def _readable(self, s: Ended) -> ReadableSpan:
        flags = TraceFlags(TraceFlags.SAMPLED)
        parent = SpanContext(s.trace_id, s.parent_id, True, flags) if s.parent_id else None
        status = Status(StatusCode.ERROR, s.error) if s.error else Status(StatusCode.UNSET)
        return ReadableSpan(
            name=s.name,
            context=SpanContext(s.trace_id, s.span_id, False, flags),
            parent=parent,
            resource=self._resource,
            attributes=dict(s.attributes) if s.attributes else {},
            status=status,
            start_time=s.start_ns,
            end_time=s.end_ns,
        )
