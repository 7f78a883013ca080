"""The sender's spans, for a transfer whose `SendSpec` carries a trace context:

    kv.message    one message on a link (DATA for one or more layers, or END): from the
                  pump handing it to the link to its completion; its context travels in
                  the message's header, so the receiver's spans hang under it
    kv.send       one layer to one receiver rank: from the engine thread queueing it
                  (right after the layer's compute) to the completion of the message
                  that carried it, so it overlaps the next layers' compute

Recorded on the pump and the transport's completion threads; nothing when the transfer
is untraced.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.trace import Span

from telemetry import TraceContext, tracing


@dataclass(slots=True)
class MessageSpan:
    span: Span
    parent: TraceContext
    dst: int  # the receiver rank
    layers: Sequence[tuple[int, int]]  # (layer, queued at, ns) of a DATA message

    @property
    def context(self) -> TraceContext | None:
        return tracing.context_of(self.span)

    def ended(self, error: str = "") -> None:
        """The message completed (with `error` if it failed): end its span and record the
        send of each layer it carried."""
        now = tracing.now_ns()
        tracing.end(self.span, error, now)
        for layer, queued_ns in self.layers:
            attrs = {"layer": layer, "dst": self.dst}
            tracing.record("kv.send", self.parent, queued_ns, now, attrs)


def queued_at(trace: TraceContext | None) -> int:
    """When a traced transfer's layer is queued (0: untraced)."""
    return tracing.now_ns() if trace is not None and trace.sampled and tracing.enabled() else 0


def message_span(
    trace: TraceContext | None,
    kind: str,
    dst: int,
    nbytes: int,
    layers: Sequence[tuple[int, int]] = (),
) -> MessageSpan | None:
    """A started `kv.message` span for a traced transfer, None otherwise."""
    if trace is None or not trace.sampled or not tracing.enabled():
        return None
    attrs: dict[str, str | int] = {"message": kind, "dst": dst, "bytes": nbytes}
    if layers:
        attrs["layer"] = layers[0][0]
        attrs["layers"] = len(layers)
    return MessageSpan(tracing.start("kv.message", trace, attrs), trace, dst, layers)
