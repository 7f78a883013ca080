"""With an OTLP endpoint, spans go to the collector as OTLP/HTTP protobuf: a loopback
HTTP server stands in for the collector and decodes what it receives."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from typing import ClassVar

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from telemetry import TraceContext, TracingSettings, tracing


class _Collector(http.server.BaseHTTPRequestHandler):
    received: ClassVar[list[tuple[str, bytes]]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def collector() -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    _Collector.received = []
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Collector)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/traces", _Collector.received
    tracing.shutdown()
    server.shutdown()
    thread.join(5)


def test_spans_go_to_the_otlp_endpoint(collector: tuple[str, list[tuple[str, bytes]]]) -> None:
    url, received = collector
    assert tracing.configure(TracingSettings(enabled=True, otlp_endpoint=url), "router")
    parent = TraceContext(0x1234, 0x5678)
    with tracing.span("validate", parent, {"tokens": 3}):
        pass
    assert tracing.flush()
    assert received and {path for path, _ in received} == {"/v1/traces"}
    spans = []
    for _, body in received:
        req = ExportTraceServiceRequest.FromString(body)
        for rs in req.resource_spans:
            service = {a.key: a.value.string_value for a in rs.resource.attributes}
            assert service["service.name"] == "router"
            spans.extend(s for ss in rs.scope_spans for s in ss.spans)
    [span] = spans
    assert span.name == "validate"
    assert int.from_bytes(span.trace_id, "big") == 0x1234
    assert int.from_bytes(span.parent_span_id, "big") == 0x5678
