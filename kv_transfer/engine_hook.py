"""The prefill engine's LayerHook: streams each request's KV to its sender as layers finish.

The prefill worker registers a request's transfer with `add(request_id, spec)` before
the engine schedules it, and `discard(request_id)` if it aborts the request. Then, on
the engine thread:

    on_layer_done(layer, chunks)   for each registered request in the step, send that
                                   layer's newly complete blocks: the full blocks from the
                                   request's cursor up to the chunk's end, plus the last,
                                   partial block when the chunk completes the prompt
    on_step_done(chunks)           advance the cursors, pinning the blocks just queued
                                   (with `pins`); `finish` the transfers whose prompt
                                   completed, before the engine frees their blocks
    on_outputs(outputs)            with `first_token` (the rank that samples: rank 0):
                                   a completed prompt's transfer is finished here
                                   instead, once the engine sampled its first token,
                                   which END carries to the decode instance (`pins`
                                   hold the blocks until then)

The sender reads a block after `send_layer` returns: it copies it out, or sends it
straight from the cache. With `pins`, every block queued is pinned (keyed by transfer
id) before the engine could free it, by finishing or by preempting the request, and
`finish` returns at once; the owner of the pins releases them once no send reads them
(`KVSender.reading`: at DONE, or once a failed transfer's sends in flight are over).
Without, `finish` returns once the sender no longer reads the blocks (for
sends straight from the cache, once they are sent), and the engine must not preempt a
request whose transfer is running.

Prefix-cached blocks at the start of the prompt are sent with the first chunk. A
request preempted and recomputed restarts its chunks; blocks already sent stay sent.
Requests that are not registered (local ones, decodes) are ignored.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

from engine.forward_hooks import ScheduledChunk
from engine.outputs import RequestOutput
from kv_transfer.base import FirstToken, SendSpec, TransferSender

logger = logging.getLogger(__name__)


class SourcePins(Protocol):
    """Keeps sent blocks allocated after the engine is done with them (engine thread)."""

    def pin(self, key: str, block_ids: Sequence[int]) -> None: ...


@dataclass
class _Request:
    transfer_id: str
    cursor: int  # next prompt block to send, for every layer


class SendHook:
    """LayerHook for a prefill engine, one per rank.

    The sender reads the engine's cache, which exists only once the engine does, so it
    may be bound after construction: `hook = SendHook(bs)`, `engine = LLMEngine(cfg,
    layer_hook=hook)`, `hook.bind(KVSender(..., engine.kv_cache, ...))`. `layer_offset`
    maps stage-local layer indices to global ones for an engine that reports local ones.
    """

    def __init__(
        self,
        block_size: int,
        sender: TransferSender | None = None,
        layer_offset: int = 0,
        pins: SourcePins | None = None,
        first_token: bool = False,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._bs, self._offset = block_size, layer_offset
        self._bound, self._pins = sender, pins
        self._first_token = first_token
        self._requests: dict[str, _Request] = {}
        self._sampling: dict[str, str] = {}  # prompt complete, first token not yet seen

    def bind(self, sender: TransferSender, pins: SourcePins | None = None) -> None:
        if self._bound is not None:
            raise RuntimeError("SendHook already has a sender")
        self._bound, self._pins = sender, pins

    @property
    def _sender(self) -> TransferSender:
        if self._bound is None:
            raise RuntimeError("SendHook has no sender; call bind() first")
        return self._bound

    def add(self, request_id: str, spec: SendSpec) -> None:
        """Start streaming `request_id`'s prompt KV as `spec` says."""
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already has a transfer")
        self._sender.open(spec)
        self._requests[request_id] = _Request(spec.transfer_id, spec.first_block)

    def discard(self, request_id: str, reason: str = "request aborted") -> None:
        """Stop streaming a request (aborting its transfer if it has not finished)."""
        req = self._requests.pop(request_id, None)
        transfer_id = req.transfer_id if req is not None else self._sampling.pop(request_id, None)
        if transfer_id is not None:
            self._sender.abort(transfer_id, reason)

    @property
    def num_requests(self) -> int:
        return len(self._requests) + len(self._sampling)

    def on_outputs(self, outputs: Sequence[RequestOutput]) -> None:
        """The engine's outputs of a step: finish each transfer whose first token came."""
        if not self._sampling:
            return
        for out in outputs:
            transfer_id = self._sampling.pop(out.request_id, None)
            if transfer_id is None:
                continue
            if out.token_ids:
                self._sender.finish(transfer_id, wait=self._pins is None, first=_first(out))
            else:
                self._sender.abort(transfer_id, "no first token")

    def _upto(self, chunk: ScheduledChunk) -> int:
        """One past the last prompt block this chunk leaves complete."""
        if chunk.completes_prompt:
            return -(-chunk.end // self._bs)
        return chunk.end // self._bs

    def _streamed(
        self, chunks: Sequence[ScheduledChunk]
    ) -> Iterator[tuple[ScheduledChunk, _Request, int]]:
        """The chunks of requests this hook streams, each with its request and `_upto`."""
        for chunk in chunks:
            req = self._requests.get(chunk.request_id)
            if req is not None:
                yield chunk, req, self._upto(chunk)

    def on_layer_done(self, layer: int, chunks: Sequence[ScheduledChunk]) -> None:
        for chunk, req, upto in self._streamed(chunks):
            if upto > req.cursor:
                self._sender.send_layer(
                    req.transfer_id,
                    layer + self._offset,
                    chunk.block_ids[req.cursor : upto],
                    req.cursor,
                )

    def on_step_done(self, chunks: Sequence[ScheduledChunk]) -> None:
        for chunk, req, upto in self._streamed(chunks):
            if upto > req.cursor:
                if self._pins is not None:
                    self._pins.pin(req.transfer_id, chunk.block_ids[req.cursor : upto])
                req.cursor = upto
            if chunk.completes_prompt:
                del self._requests[chunk.request_id]
                if self._first_token:
                    self._sampling[chunk.request_id] = req.transfer_id
                else:
                    self._sender.finish(req.transfer_id, wait=self._pins is None)


def _first(out: RequestOutput) -> FirstToken:
    # the token this engine sampled: the last one (a resumed request's output starts
    # with the tokens another instance generated; its logprobs are only this engine's)
    lp = out.logprobs[-1] if out.logprobs else None
    return FirstToken(
        out.token_ids[-1],
        out.sampler_draws,
        lp.logprob if lp is not None else None,
        lp.top if lp is not None else (),
        time.time(),
    )
