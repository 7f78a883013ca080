"""Spans of a prefill engine's steps, per traced request, recorded on the engine thread
around the replica's LayerHook (which it forwards every call to):

    prefill.queue    the request's arrival at the replica (`add`'s `since_ns`) to the
                     start of its first chunk's step
    prefill.chunk    one engine step that computes a chunk of the prompt (chunk=k)
      prefill.layer  one layer of that step: from the previous layer's end (the step's
                     start for layer 0, so it includes scheduling and the embedding) to
                     the moment its KV is complete and handed to the sender

The engine loop's `tick` (`mark_step`) marks each step's start. Untraced requests, and
all of them with tracing off, cost one dict lookup per step.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from opentelemetry.trace import Span

from engine.forward_hooks import LayerHook, ScheduledChunk
from telemetry import TraceContext, tracing


@dataclass
class _Traced:
    parent: TraceContext
    queued_ns: int
    chunks: int = 0
    chunk: Span | None = None  # the step's chunk span, while it runs
    last_ns: int = 0  # end of the previous layer


class LayerSpans:
    def __init__(self, inner: LayerHook) -> None:
        self._inner = inner
        self._traced: dict[str, _Traced] = {}
        self._step_ns = 0

    def add(self, request_id: str, parent: TraceContext | None, since_ns: int = 0) -> None:
        """Trace the request's steps under `parent` (engine thread; None: untraced);
        its queue span starts at `since_ns` (0: now)."""
        if parent is not None and parent.sampled and tracing.enabled():
            self._traced[request_id] = _Traced(parent, since_ns or tracing.now_ns())

    def discard(self, request_id: str) -> None:
        t = self._traced.pop(request_id, None)
        if t is not None and t.chunk is not None:
            tracing.end(t.chunk, "aborted")

    def mark_step(self) -> None:
        """The engine loop's tick: a step may start now."""
        self._step_ns = tracing.now_ns()

    def on_layer_done(self, layer: int, chunks: Sequence[ScheduledChunk]) -> None:
        if self._traced:
            now = tracing.now_ns()
            for c in chunks:
                t = self._traced.get(c.request_id)
                if t is not None:
                    self._layer(t, layer, c, now)
        self._inner.on_layer_done(layer, chunks)

    def _layer(self, t: _Traced, layer: int, c: ScheduledChunk, now: int) -> None:
        if t.chunk is None:
            start = self._step_ns or now
            if t.chunks == 0:
                tracing.record("prefill.queue", t.parent, t.queued_ns, start)
            attrs = {"chunk": t.chunks, "tokens": c.end - c.start}
            t.chunk = tracing.start("prefill.chunk", t.parent, attrs, start)
            t.last_ns = start
        tracing.record("prefill.layer", t.chunk, t.last_ns, now, {"layer": layer})
        t.last_ns = now

    def on_step_done(self, chunks: Sequence[ScheduledChunk]) -> None:
        self._inner.on_step_done(chunks)
        if not self._traced:
            return
        now = tracing.now_ns()
        for c in chunks:
            t = self._traced.get(c.request_id)
            if t is None or t.chunk is None:
                continue
            tracing.end(t.chunk, end_ns=now)
            t.chunk, t.chunks = None, t.chunks + 1
            if c.completes_prompt:
                del self._traced[c.request_id]

    @property
    def num_traced(self) -> int:
        return len(self._traced)
