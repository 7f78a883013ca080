"""The span recorder: spans wait in a bounded buffer and leave in batches on the
recorder's thread or at a flush; a full buffer drops (counted), a failing export is
counted and never raises into the recording thread."""

from __future__ import annotations

import threading
import time

from opentelemetry.trace import Status, StatusCode

from telemetry.spans import Ended, LiveSpan, Recorder, sample


def _ended(i: int) -> Ended:
    return Ended("s", 1, i + 1, 0, 10, 20, {"i": i}, "")


def test_spans_leave_in_batches_on_the_recorders_thread() -> None:
    batches: list[tuple[str, int]] = []
    got = threading.Event()

    def export(spans: list[Ended]) -> bool:
        batches.append((threading.current_thread().name, len(spans)))
        got.set()
        return True

    rec = Recorder("svc", export, delay_s=0.01, capacity=10_000).start()
    try:
        for i in range(300):
            rec.add(_ended(i))
        assert got.wait(10.0)
        deadline = time.monotonic() + 10.0
        while sum(n for _, n in batches) < 300 and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        rec.stop()
    assert sum(n for _, n in batches) == 300
    assert {name for name, _ in batches} == {"span-export"}
    assert max(n for _, n in batches) <= 128  # it lets go of the GIL between batches


def test_a_full_buffer_drops_and_counts() -> None:
    exported: list[Ended] = []
    rec = Recorder("svc", lambda s: exported.extend(s) or True, delay_s=3600, capacity=5)
    for i in range(8):
        rec.add(_ended(i))
    assert rec.dropped == 3
    assert rec.flush()
    assert [s.span_id for s in exported] == [1, 2, 3, 4, 5]


def test_a_failing_export_is_counted_not_raised() -> None:
    def export(spans: list[Ended]) -> bool:
        raise ConnectionError("store down")

    rec = Recorder("svc", export, delay_s=3600, capacity=100)
    rec.add(_ended(0))
    assert rec.flush() is False
    assert rec.failed_batches == 1
    rec.add(_ended(1))
    rec.stop()
    assert rec.failed_batches == 2


def test_a_live_span_ends_once_with_its_error_and_attributes() -> None:
    rec = Recorder("svc", lambda s: True, delay_s=3600, capacity=100)
    span = LiveSpan(rec, "prefill", trace_id=7, parent_id=3, start_ns=5, attributes={"a": 1})
    span.set_attribute("b", "x")
    span.set_status(Status(StatusCode.ERROR, "boom"))
    assert span.is_recording()
    span.end(9)
    span.end(11)
    assert not span.is_recording()
    [s] = list(rec._buffer)
    assert (s.name, s.trace_id, s.parent_id, s.start_ns, s.end_ns) == ("prefill", 7, 3, 5, 9)
    assert s.span_id == span.get_span_context().span_id
    assert dict(s.attributes or {}) == {"a": 1, "b": "x"} and s.error == "boom"
    record = s.to_record("svc")
    assert record.parent_id == f"{3:016x}" and record.service == "svc"


def test_sampling_follows_the_ratio_by_trace_id() -> None:
    assert sample(12345, 1.0) and not sample(12345, 0.0)
    ids = range(1, 1 << 16)
    kept = sum(sample(i << 48, 0.25) for i in ids)  # low 64 bits spread over the range
    assert abs(kept / len(ids) - 0.25) < 0.01
