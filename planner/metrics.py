"""What a simulation predicts: per-request TTFT and TPOT, their percentiles, SLO
attainment and goodput.

Attainment, as DistServe defines it: the share of requests that meet both the TTFT and
the TPOT SLO (a one-token output has no TPOT and meets it). A layout "meets the SLO at
percentile P" when attainment >= P/100, which is at most as strict as asking the P-th
percentile of each metric separately to be within its SLO.

Goodput: the highest request rate whose attainment meets the goal, found by bisection
over the rate on runs with common random numbers (see `planner.workload`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from benchmarks.slo import percentile


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float
    percentile: float = 90.0

    def __post_init__(self) -> None:
        if self.ttft_s <= 0 or self.tpot_s <= 0:
            raise ValueError("ttft_s and tpot_s must be > 0")
        if not 0 < self.percentile <= 100:
            raise ValueError("percentile must be in (0, 100]")

    @property
    def goal(self) -> float:
        return self.percentile / 100.0


@dataclass(frozen=True)
class RequestTiming:
    arrival: float
    ttft: float
    tpot: float  # NaN for a one-token output
    e2e: float
    local_prefill: bool

    def meets(self, slo: Slo) -> bool:
        return self.ttft <= slo.ttft_s and (math.isnan(self.tpot) or self.tpot <= slo.tpot_s)


@dataclass(frozen=True)
class SimResult:
    requests: list[RequestTiming]

    def ttfts(self) -> list[float]:
        return [r.ttft for r in self.requests]

    def tpots(self) -> list[float]:
        return [r.tpot for r in self.requests if not math.isnan(r.tpot)]

    def ttft_p(self, p: float) -> float:
        return percentile(self.ttfts(), p)

    def tpot_p(self, p: float) -> float:
        return percentile(self.tpots(), p)

    def mean_ttft(self) -> float:
        xs = self.ttfts()
        return sum(xs) / len(xs)

    def attainment(self, slo: Slo) -> float:
        return sum(r.meets(slo) for r in self.requests) / len(self.requests)


@dataclass(frozen=True)
class GoodputResult:
    rate: float  # requests per second; 0 when even the lowest rate misses the goal
    attainment: float  # at `rate`
    runs: int  # simulations it took


def goodput(
    attainment_at: Callable[[float], float],
    goal: float,
    high: float,
    rel_tol: float = 0.02,
    max_runs: int = 40,
) -> GoodputResult:
    """The highest rate in (0, `high`] with attainment >= goal, by bisection.

    `high` should be an upper bound (a capacity bound); if it meets the goal it is
    returned. Assumes attainment falls with rate, which common random numbers make
    true up to noise.
    """
    runs = 1
    top = attainment_at(high)
    if top >= goal:
        return GoodputResult(high, top, runs)
    lo, lo_att, hi = 0.0, 1.0, high
    while hi - lo > rel_tol * hi and runs < max_runs:
        mid = (lo + hi) / 2
        att = attainment_at(mid)
        runs += 1
        if att >= goal:
            lo, lo_att = mid, att
        else:
            hi = mid
    return GoodputResult(lo, lo_att if lo > 0 else 0.0, runs)
