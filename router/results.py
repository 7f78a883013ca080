"""What the router streams to its front ends: token deltas, and a `Finish` with usage
and timings on the last one. Both the gRPC servicer and the OpenAI app render these."""

from __future__ import annotations

from dataclasses import dataclass

from engine import TokenLogprob


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class Timings:
    """Milliseconds. TTFT is measured by the router (arrival to the first token leaving
    it); prefill, transfer and TPOT by the engines. `queue_ms` is the rest of the TTFT:
    routing, hops and engine queueing, so queue + prefill + kv_transfer = ttft."""

    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    ttft_ms: float
    mean_tpot_ms: float
    disaggregated: bool
    migrations: int = 0  # times the stream moved to another decode instance


@dataclass(frozen=True)
class Finish:
    reason: str  # stop | length | abort
    stop_reason: str | int | None
    usage: Usage
    timings: Timings


@dataclass(frozen=True)
class Delta:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finish: Finish | None = None
