"""What the engine returns for a request after a step."""

from __future__ import annotations

from dataclasses import dataclass, field

from engine.sampling import TokenLogprob


@dataclass(frozen=True)
class RequestMetrics:
    queue_s: float  # arrival to first scheduled
    prefill_s: float  # first scheduled to first token
    ttft_s: float  # arrival to first token
    tpot_s: float  # mean time per output token after the first
    num_cached_tokens: int  # prompt tokens served from the prefix cache
    first_token_at: float = 0.0  # time.monotonic() when the first token was sampled


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # every output token so far
    text: str  # the output text so far (stop strings cut)
    finished: bool
    finish_reason: str | None  # stop | length | abort
    stop_reason: str | int | None = None  # the stop string or stop token that ended it
    logprobs: list[TokenLogprob] | None = None
    new_token_ids: list[int] = field(default_factory=list)  # since the previous output
    new_text: str = ""
    metrics: RequestMetrics | None = None
    # How many tokens a seeded request's generator has sampled (0 for greedy or
    # unseeded requests), so a decode instance can continue the exact random stream a
    # prefill instance began (`sampling.skip_draws`).
    sampler_draws: int = 0


@dataclass(frozen=True)
class EngineLoad:
    """What a load report needs, read in one place."""

    waiting_seqs: int
    running_seqs: int
    queued_prefill_tokens: int  # prompt tokens not yet computed (waiting and running)
    free_blocks: int
    total_blocks: int
