"""This process's span recorder: spans as plain tuples in a bounded buffer, turned into
`SpanRecord`s (or OTLP spans) only on the recorder's own export thread.

A span on the request path costs a few microseconds of the thread that records it: no
SDK objects, locks or queues per span. What used to cost tens of microseconds per span
(building SDK spans, batching, serializing) runs off the request path, every
`export_delay_s`, in one batch. The engine thread of a pool replica records a span per
layer, and any Python work on the request path's threads also delays the engine
thread's next torch call, which waits for the interpreter lock.

Lifecycle:

    Recorder(service, export, delay_s, capacity, close).start()
    LiveSpan(...) / add(...)         any thread: a span ends into the buffer
    the export thread                every delay_s: drain the buffer, hand the batch
                                     to `export` (its failures are counted and logged)
    flush(timeout_s)                 export what is buffered now (any thread)
    stop()                           the thread exits; export what is left, then close

The buffer holds at most `capacity` spans; beyond that new spans are dropped and
counted (`dropped`), as a batch span processor does when its exporter falls behind.
"""

from __future__ import annotations

import collections
import logging
import random
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import NamedTuple

from opentelemetry import trace
from opentelemetry.trace import SpanContext, Status, StatusCode, TraceFlags
from opentelemetry.util.types import Attributes, AttributeValue

from telemetry.records import Attr, SpanRecord

logger = logging.getLogger(__name__)

_SAMPLED = TraceFlags(TraceFlags.SAMPLED)
# Spans exported at a time: between two batches the export thread lets go of the
# interpreter lock, so it never holds it for long against the engine thread.
_BATCH = 128


class Ended(NamedTuple):
    """One finished span, as it waits in the buffer."""

    name: str
    trace_id: int
    span_id: int
    parent_id: int  # 0 for a root span
    start_ns: int
    end_ns: int
    attributes: Mapping[str, Attr] | None
    error: str

    def to_record(self, service: str) -> SpanRecord:
        attrs = self.attributes
        return SpanRecord(
            trace_id=f"{self.trace_id:032x}",
            span_id=f"{self.span_id:016x}",
            parent_id=f"{self.parent_id:016x}" if self.parent_id else "",
            name=self.name,
            service=service,
            start_ns=self.start_ns,
            end_ns=self.end_ns,
            attributes={k: v for k, v in attrs.items() if isinstance(v, Attr)} if attrs else {},
            error=self.error,
        )


Export = Callable[[list[Ended]], bool]  # whether the batch was delivered


def new_span_id() -> int:
    return random.getrandbits(64) or 1


def new_trace_id() -> int:
    return random.getrandbits(128) or 1


class Recorder:
    def __init__(
        self,
        service: str,
        export: Export,
        delay_s: float,
        capacity: int,
        close: Callable[[], None] | None = None,
    ) -> None:
        self.service = service
        self._export = export
        self._close = close
        self._delay_s = delay_s
        self._capacity = capacity
        self._buffer: collections.deque[Ended] = collections.deque()
        self._export_lock = threading.Lock()  # one batch at a time
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="span-export", daemon=True)
        self.dropped = 0
        self.failed_batches = 0

    def start(self) -> Recorder:
        self._thread.start()
        return self

    def add(self, span: Ended) -> None:
        """Any thread: one finished span (dropped, counted, when the buffer is full)."""
        if len(self._buffer) >= self._capacity:
            self.dropped += 1
            return
        self._buffer.append(span)

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Export what is buffered now; whether every batch was delivered in time."""
        if not self._export_lock.acquire(timeout=timeout_s):
            return False
        try:
            return self._drain()
        finally:
            self._export_lock.release()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        self.flush(timeout_s)
        if self._close is not None:
            self._close()

    def _drain(self) -> bool:
        ok = True
        while self._buffer:
            batch: list[Ended] = []
            while self._buffer and len(batch) < _BATCH:
                batch.append(self._buffer.popleft())
            try:
                delivered = self._export(batch)
            except Exception:
                logger.exception("span export raised")
                delivered = False
            if not delivered:
                ok = False
                self.failed_batches += 1
                if self.failed_batches in (1, 10) or self.failed_batches % 1000 == 0:
                    logger.warning("span export failed (%d batches)", self.failed_batches)
            time.sleep(0)  # let a waiting thread (an engine's next torch call) take the GIL
        return ok

    def _run(self) -> None:
        while not self._stop.wait(self._delay_s):
            self.flush(self._delay_s)


class LiveSpan(trace.Span):
    """A sampled span between `start` and `end`; ending it hands it to the recorder."""

    __slots__ = ("_attrs", "_ctx", "_ended", "_error", "_name", "_parent_id", "_rec", "_start")

    def __init__(
        self,
        recorder: Recorder,
        name: str,
        trace_id: int,
        parent_id: int,
        start_ns: int,
        attributes: Mapping[str, Attr] | None,
    ) -> None:
        self._rec = recorder
        self._name = name
        self._ctx = SpanContext(trace_id, new_span_id(), False, _SAMPLED)
        self._parent_id = parent_id
        self._start = start_ns
        self._attrs: dict[str, Attr] | None = dict(attributes) if attributes else None
        self._error = ""
        self._ended = False

    def get_span_context(self) -> SpanContext:
        return self._ctx

    def set_attributes(self, attributes: Mapping[str, AttributeValue]) -> None:
        for key, value in attributes.items():
            self.set_attribute(key, value)

    def set_attribute(self, key: str, value: AttributeValue) -> None:
        if isinstance(value, Attr):
            if self._attrs is None:
                self._attrs = {}
            self._attrs[key] = value

    def add_event(
        self, name: str, attributes: Attributes = None, timestamp: int | None = None
    ) -> None:
        pass  # pdserve records no span events

    def update_name(self, name: str) -> None:
        self._name = name

    def is_recording(self) -> bool:
        return not self._ended

    def set_status(self, status: Status | StatusCode, description: str | None = None) -> None:
        code = status.status_code if isinstance(status, Status) else status
        if code is StatusCode.ERROR:
            text = status.description if isinstance(status, Status) else description
            self._error = text or "error"

    def record_exception(
        self,
        exception: BaseException,
        attributes: Attributes = None,
        timestamp: int | None = None,
        escaped: bool = False,
    ) -> None:
        self._error = self._error or f"{type(exception).__name__}: {exception}"

    def end(self, end_time: int | None = None) -> None:
        if self._ended:
            return
        self._ended = True
        ctx = self._ctx
        end_ns = end_time if end_time is not None else time.time_ns()
        self._rec.add(
            Ended(
                self._name,
                ctx.trace_id,
                ctx.span_id,
                self._parent_id,
                self._start,
                end_ns,
                self._attrs,
                self._error,
            )
        )


def sample(trace_id: int, ratio: float) -> bool:
    """A new trace's sampling decision, from its id (as OpenTelemetry's ratio sampler
    decides: the low 64 bits against the ratio's share of 2^64)."""
    return (trace_id & ((1 << 64) - 1)) < int(ratio * (1 << 64))


def batch_records(spans: Sequence[Ended], service: str) -> list[SpanRecord]:
    return [s.to_record(service) for s in spans]
