"""Sampling parameters and the sampler.

`SamplingParams` has vLLM's fields and meanings (temperature 0 is greedy). The
sampler turns a step's logits into one token per sequence: greedy rows in one
argmax, random rows through temperature, top-k and top-p, each seeded request with
its own generator so that its output is reproducible whatever else is in the batch.
Logprobs are of the model's raw distribution.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

_GREEDY_EPS = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 or 0: no limit
    max_tokens: int = 16
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None  # top-n alternatives besides the chosen token

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)

    def validate(self, vocab_size: int, max_stop_strings: int = 16, max_logprobs: int = 20) -> None:
        """Raise ValueError naming the first bad field."""
        if self.temperature < 0 or self.temperature != self.temperature:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < -1:
            raise ValueError(f"top_k must be -1 (off) or >= 0, got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if len(self.stop) > max_stop_strings:
            raise ValueError(f"stop: at most {max_stop_strings} stop strings, got {len(self.stop)}")
        if any(not isinstance(s, str) or not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop: each stop string must be 1..256 characters")
        bad = [t for t in self.stop_token_ids if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"stop_token_ids: {bad[0]} is outside the vocabulary")
        if self.logprobs is not None and not 0 <= self.logprobs <= max_logprobs:
            raise ValueError(f"logprobs must be in [0, {max_logprobs}], got {self.logprobs}")
        if self.seed is not None and not 0 <= self.seed < 2**63:
            raise ValueError(f"seed must be in [0, 2**63), got {self.seed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS or self.top_k == 1


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, logprob), best first


def skip_draws(gen: torch.Generator, vocab_size: int, draws: int) -> None:
    """Advance a request's generator past `draws` sampled tokens, as if this process had
    sampled them: a seeded request continues another instance's random stream from
    (seed, draws) alone. A draw's consumption depends only on the vocabulary size
    (`multinomial` of one sample races one exponential per token)."""
    if draws < 0:
        raise ValueError(f"draws must be >= 0, got {draws}")
    if draws:
        ones = torch.ones(vocab_size, dtype=torch.float32, device=gen.device)
        for _ in range(draws):
            torch.multinomial(ones, 1, generator=gen)


class Sampler:
    def __init__(self, seed: int = 0) -> None:
        self._seed = seed
        self._defaults: dict[torch.device, torch.Generator] = {}

    def _default(self, device: torch.device) -> torch.Generator:
        """The shared generator for unseeded requests, one per device."""
        gen = self._defaults.get(device)
        if gen is None:
            gen = self._defaults[device] = torch.Generator(device=device).manual_seed(self._seed)
        return gen

    def sample(
        self,
        logits: torch.Tensor,
        params: list[SamplingParams],
        generators: list[torch.Generator | None],
    ) -> tuple[list[int], list[TokenLogprob | None]]:
        """One token per row of `logits` [B, vocab] (fp32), with optional logprobs."""
        logits = logits.float()
        tokens = logits.argmax(dim=-1)
        for row, p in enumerate(params):
            if not p.greedy:
                tokens[row] = self._sample_row(logits[row], p, generators[row])
        ids = tokens.tolist()
        lps: list[TokenLogprob | None] = [None] * len(params)
        want = [r for r, p in enumerate(params) if p.logprobs is not None]
        if want:
            lp = torch.log_softmax(logits[want], dim=-1)
            for j, row in enumerate(want):
                n = params[row].logprobs or 0
                top_v, top_i = lp[j].topk(n) if n else (lp[j][:0], lp[j][:0].long())
                lps[row] = TokenLogprob(
                    ids[row],
                    float(lp[j, ids[row]]),
                    tuple(zip(top_i.tolist(), top_v.tolist(), strict=True)),
                )
        return ids, lps

    def _sample_row(
        self, logits: torch.Tensor, p: SamplingParams, gen: torch.Generator | None
    ) -> torch.Tensor:
        x = logits / p.temperature
        if p.top_k > 0 and p.top_k < x.shape[-1]:
            kth = torch.topk(x, p.top_k).values[-1]
            x = x.masked_fill(x < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_x, order = torch.sort(x, descending=True)
            probs = torch.softmax(sorted_x, dim=-1)
            # Drop a token once the mass before it already reaches top_p.
            drop = (probs.cumsum(-1) - probs) >= p.top_p
            sorted_x = sorted_x.masked_fill(drop, float("-inf"))
            x = torch.empty_like(x).scatter_(0, order, sorted_x)
        probs = torch.softmax(x, dim=-1)
        return torch.multinomial(probs, 1, generator=gen or self._default(probs.device))[0]
