"""Hook points into the forward pass, for streaming KV out as it is produced.

A `LayerHook` sees each layer finish writing this step's K/V, and then the end of the
step. Both calls come on the engine's thread, in order; the step's blocks stay
allocated until `on_step_done` returns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class ScheduledChunk:
    request_id: str
    block_ids: tuple[int, ...]  # the sequence's whole block table after this step's allocation
    start: int  # first token position this step computes
    end: int  # one past the last position this step computes
    completes_prompt: bool  # this chunk is the prompt's last


class LayerHook(Protocol):
    def on_layer_done(self, layer: int, chunks: Sequence[ScheduledChunk]) -> None: ...

    def on_step_done(self, chunks: Sequence[ScheduledChunk]) -> None: ...
