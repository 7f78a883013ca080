"""The prefill engine's step spans, per traced request: queue, chunk and layer spans in
order and under the right parents, every hook call forwarded, nothing for untraced
requests."""

from __future__ import annotations

from collections.abc import Sequence

from engine.forward_hooks import ScheduledChunk
from telemetry import TraceContext, tracing
from telemetry.records import SpanRecord
from worker.layer_spans import LayerSpans


class Recorder:
    def __init__(self) -> None:
        self.calls: list[tuple[str, int]] = []

    def on_layer_done(self, layer: int, chunks: Sequence[ScheduledChunk]) -> None:
        self.calls.append(("layer", layer))

    def on_step_done(self, chunks: Sequence[ScheduledChunk]) -> None:
        self.calls.append(("step", len(chunks)))


def _step(hook: LayerSpans, chunks: tuple[ScheduledChunk, ...], layers: int) -> None:
    hook.mark_step()
    for layer in range(layers):
        hook.on_layer_done(layer, chunks)
    hook.on_step_done(chunks)


def test_traced_requests_get_queue_chunk_and_layer_spans(spans: list[SpanRecord]) -> None:
    inner = Recorder()
    hook = LayerSpans(inner)
    parent = TraceContext(0xA1, 0xB2)
    hook.add("r1", parent, since_ns=tracing.now_ns() - 5_000_000)
    hook.add("r2", None)  # untraced
    first = (ScheduledChunk("r1", (0, 1), 0, 8, False), ScheduledChunk("r2", (2,), 0, 4, True))
    second = (ScheduledChunk("r1", (0, 1, 3), 8, 12, True),)
    _step(hook, first, 2)
    _step(hook, second, 2)
    assert hook.num_traced == 0  # the prompt completed
    assert inner.calls == [("layer", 0), ("layer", 1), ("step", 2)] * 1 + [
        ("layer", 0), ("layer", 1), ("step", 1),
    ]  # fmt: skip
    assert tracing.flush()
    names = sorted((s.name, s.attributes.get("chunk", s.attributes.get("layer"))) for s in spans)
    assert names == [
        ("prefill.chunk", 0), ("prefill.chunk", 1), ("prefill.layer", 0), ("prefill.layer", 0),
        ("prefill.layer", 1), ("prefill.layer", 1), ("prefill.queue", None),
    ]  # fmt: skip
    chunks = {s.attributes["chunk"]: s for s in spans if s.name == "prefill.chunk"}
    assert chunks[0].attributes["tokens"] == 8 and chunks[1].attributes["tokens"] == 4
    queue = next(s for s in spans if s.name == "prefill.queue")
    assert queue.parent_id == f"{0xB2:016x}" and queue.end_ns == chunks[0].start_ns
    assert queue.duration_ns >= 5_000_000
    for s in spans:
        if s.name == "prefill.layer":
            chunk = next(c for c in chunks.values() if c.span_id == s.parent_id)
            assert chunk.start_ns <= s.start_ns <= s.end_ns <= chunk.end_ns
    layers0 = sorted(
        (s for s in spans if s.parent_id == chunks[0].span_id), key=lambda s: s.start_ns
    )
    assert layers0[0].end_ns == layers0[1].start_ns  # a layer starts where the last ended


def test_a_discarded_request_ends_its_open_chunk(spans: list[SpanRecord]) -> None:
    hook = LayerSpans(Recorder())
    hook.add("r1", TraceContext(1, 2))
    hook.mark_step()
    hook.on_layer_done(0, (ScheduledChunk("r1", (0,), 0, 4, False),))
    hook.discard("r1")
    assert hook.num_traced == 0 and tracing.flush()
    [chunk] = [s for s in spans if s.name == "prefill.chunk"]
    assert chunk.error == "aborted"
