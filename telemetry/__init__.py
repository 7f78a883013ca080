"""Request ids and traces across the cluster's processes: the request-id log context,
the trace context that crosses process boundaries, this process's tracer and the
waterfall view of one trace. Imports no other pdserve package."""

from telemetry.context import TraceContext, install_log_records, request_scope, valid_request_id
from telemetry.records import SpanRecord
from telemetry.tracing import TracingSettings

__all__ = [
    "SpanRecord",
    "TraceContext",
    "TracingSettings",
    "install_log_records",
    "request_scope",
    "valid_request_id",
]
