"""Step-time models of one engine replica, fitted from a profile or given by hand.

All times are seconds. A prefill step over chunks `(k_i tokens, c_i tokens of context
before the chunk)` costs

    prefill = a + b * sum(k_i) + c * sum(k_i * (c_i + k_i))

which for whole prompts of lengths L_i is a + b * sum(L_i) + c * sum(L_i^2): the linear
layers scale with tokens and causal attention with the square of each prompt (the
shape DistServe's simulator fits). A decode step over `batch` sequences holding
`context` tokens of KV between them costs

    decode = a + b * batch + c * context

(the weights are read once a step; each sequence adds its sampling and its KV reads).
A step that mixes both (chunked prefill next to running decodes) pays both, with the
fixed cost once: prefill + decode - min(a_prefill, a_decode). A KV transfer of n bytes
costs a + b * n.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PrefillCost:
    a: float
    b: float
    c: float

    def __post_init__(self) -> None:
        if min(self.a, self.b, self.c) < 0:
            raise ValueError(f"prefill coefficients must be >= 0, got {self}")

    def time(self, chunks: Sequence[tuple[int, int]]) -> float:
        """Seconds for one step over `(tokens, context before)` chunks."""
        if not chunks:
            return 0.0
        tokens = sum(k for k, _ in chunks)
        attention = sum(k * (before + k) for k, before in chunks)
        return self.a + self.b * tokens + self.c * attention

    def prompt(self, tokens: int) -> float:
        return self.time([(tokens, 0)])


@dataclass(frozen=True)
class DecodeCost:
    a: float
    b: float
    c: float

    def __post_init__(self) -> None:
        if min(self.a, self.b, self.c) < 0:
            raise ValueError(f"decode coefficients must be >= 0, got {self}")

    def time(self, batch: int, context: int) -> float:
        """Seconds for one step of `batch` sequences with `context` KV tokens in all."""
        if batch <= 0:
            return 0.0
        return self.a + self.b * batch + self.c * context


@dataclass(frozen=True)
class TransferCost:
    a: float
    b: float  # seconds per byte

    def __post_init__(self) -> None:
        if min(self.a, self.b) < 0:
            raise ValueError(f"transfer coefficients must be >= 0, got {self}")

    def time(self, nbytes: int) -> float:
        return self.a + self.b * nbytes if nbytes > 0 else 0.0


ZERO_TRANSFER = TransferCost(0.0, 0.0)


@dataclass(frozen=True)
class StepCost:
    """What one replica of one TP/PP layout costs per step."""

    prefill: PrefillCost
    decode: DecodeCost

    def step(self, chunks: Sequence[tuple[int, int]], batch: int, context: int) -> float:
        p = self.prefill.time(chunks)
        d = self.decode.time(batch, context)
        if p and d:
            return p + d - min(self.prefill.a, self.decode.a)
        return p + d
