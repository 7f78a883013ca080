"""Per-request latency of streamed generations, percentiles, SLO attainment and goodput.

A `StreamRecord` is started when a request is sent and told when each chunk of tokens
arrives (`chunk(n)`), then `finish()`ed or `fail()`ed. From its clock readings:

* TTFT: from sending to the first token;
* E2E: from sending to the last token;
* TPOT: (E2E - TTFT) / (output tokens - 1), the mean time per output token after the
  first; undefined for a one-token output;
* ITL: the gaps between successive chunks; a chunk of k tokens contributes k gaps of
  gap/k each, so a request has (output tokens - 1) ITL values whatever the chunking.

Goodput, as DistServe defines it: the highest request rate at which at least
`attainment` (90%) of requests meet both the TTFT SLO and the TPOT SLO. A request that
failed, or did not finish, misses both. With a discrete sweep of rates, `goodput` walks
the rates upwards and stops at the first one that misses the goal; it also reports a
linear interpolation of the crossing between that rate and the one before.

The locustfile uses `StreamRecord` too, so both report the same quantities. Standard
library only.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

PERCENTILES = (50, 90, 99)


@dataclass
class StreamRecord:
    """Clock readings (time.perf_counter seconds) of one streamed request."""

    prompt_tokens: int
    output_len: int  # tokens asked for
    sent: float = field(default_factory=time.perf_counter)
    chunks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, tokens)
    error: str | None = None
    done: bool = False
    server: dict[str, Any] = field(default_factory=dict)  # the server's own timings

    def chunk(self, tokens: int, now: float | None = None) -> None:
        if tokens > 0:
            self.chunks.append((time.perf_counter() if now is None else now, tokens))

    def finish(self) -> None:
        self.done = True

    def fail(self, error: str) -> None:
        self.error = error

    @property
    def ok(self) -> bool:
        return self.done and self.error is None and self.output_tokens > 0

    @property
    def output_tokens(self) -> int:
        return sum(n for _, n in self.chunks)

    @property
    def ttft(self) -> float | None:
        return self.chunks[0][0] - self.sent if self.chunks else None

    @property
    def e2e(self) -> float | None:
        return self.chunks[-1][0] - self.sent if self.chunks else None

    @property
    def tpot(self) -> float | None:
        n = self.output_tokens
        if n < 2:
            return None
        return (self.chunks[-1][0] - self.chunks[0][0]) / (n - 1)

    def itls(self) -> list[float]:
        out: list[float] = []
        for (before, _), (at, n) in itertools.pairwise(self.chunks):
            out.extend([(at - before) / n] * n)
        if self.chunks and self.chunks[0][1] > 1:  # tokens that came with the first one
            out.extend([0.0] * (self.chunks[0][1] - 1))
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "output_len": self.output_len,
            "output_tokens": self.output_tokens,
            "ok": self.ok,
            "error": self.error,
            "ttft_s": self.ttft,
            "tpot_s": self.tpot,
            "e2e_s": self.e2e,
            "chunks": len(self.chunks),
            "server": self.server,
        }


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation (numpy's default); NaN if empty."""
    if not values:
        return math.nan
    xs = sorted(values)
    k = (len(xs) - 1) * p / 100.0
    lo = math.floor(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


@dataclass(frozen=True)
class Slo:
    ttft_s: float
    tpot_s: float

    def scaled(self, factor: float) -> Slo:
        return Slo(self.ttft_s * factor, self.tpot_s * factor)

    def meets_ttft(self, r: StreamRecord) -> bool:
        return r.ok and r.ttft is not None and r.ttft <= self.ttft_s

    def meets_tpot(self, r: StreamRecord) -> bool:
        tpot = r.tpot
        return r.ok and (tpot is None or tpot <= self.tpot_s)

    def meets(self, r: StreamRecord) -> bool:
        return self.meets_ttft(r) and self.meets_tpot(r)


def attainment(records: Sequence[StreamRecord], meets: Callable[[StreamRecord], bool]) -> float:
    """Share of all requests (failed ones included) for which `meets` holds."""
    return sum(meets(r) for r in records) / len(records) if records else 0.0


@dataclass(frozen=True)
class Distribution:
    """Percentiles of one latency metric over one rate's requests, in milliseconds."""

    count: int
    mean_ms: float
    p_ms: dict[int, float]

    @classmethod
    def of(cls, seconds: Sequence[float]) -> Distribution:
        ms = [s * 1000.0 for s in seconds]
        mean = sum(ms) / len(ms) if ms else math.nan
        return cls(len(ms), mean, {p: percentile(ms, p) for p in PERCENTILES})

    def as_json(self) -> dict[str, Any]:
        return {"count": self.count, "mean_ms": self.mean_ms} | {
            f"p{p}_ms": v for p, v in self.p_ms.items()
        }


@dataclass(frozen=True)
class RateSummary:
    """One mode at one request rate."""

    rate: float
    sent: int
    ok: int
    duration_s: float  # first send to last token
    ttft: Distribution
    tpot: Distribution
    itl: Distribution
    e2e: Distribution
    attainment: float  # both SLOs
    ttft_attainment: float
    tpot_attainment: float
    output_tok_s: float

    @classmethod
    def of(cls, rate: float, records: Sequence[StreamRecord], slo: Slo) -> RateSummary:
        good = [r for r in records if r.ok]
        ends = [r.sent + (r.e2e or 0.0) for r in good]
        start = min((r.sent for r in records), default=0.0)
        duration = max(ends, default=start) - start
        tokens = sum(r.output_tokens for r in good)
        return cls(
            rate=rate,
            sent=len(records),
            ok=len(good),
            duration_s=duration,
            ttft=Distribution.of([r.ttft for r in good if r.ttft is not None]),
            tpot=Distribution.of([r.tpot for r in good if r.tpot is not None]),
            itl=Distribution.of([x for r in good for x in r.itls()]),
            e2e=Distribution.of([r.e2e for r in good if r.e2e is not None]),
            attainment=attainment(records, slo.meets),
            ttft_attainment=attainment(records, slo.meets_ttft),
            tpot_attainment=attainment(records, slo.meets_tpot),
            output_tok_s=tokens / duration if duration > 0 else 0.0,
        )


@dataclass(frozen=True)
class Goodput:
    """The highest swept rate meeting the attainment goal, walking upwards."""

    rate: float  # 0.0 when even the lowest rate misses the goal
    interpolated: float  # the crossing between `rate` and the next rate, linearly
    below_sweep: bool  # the lowest rate already misses: goodput is under it
    above_sweep: bool  # every rate meets the goal: goodput is at least `rate`

    def as_json(self) -> dict[str, Any]:
        return {
            "rate": self.rate,
            "interpolated": self.interpolated,
            "below_sweep": self.below_sweep,
            "above_sweep": self.above_sweep,
        }

    def describe(self) -> str:
        if self.below_sweep:
            return "< lowest rate"
        if self.above_sweep:
            return f">= {self.rate:g}"
        return f"{self.rate:g} (interpolated {self.interpolated:.3f})"


def goodput(points: Sequence[tuple[float, float]], goal: float = 0.9) -> Goodput:
    """Goodput from (rate, attainment) points of a sweep."""
    pts = sorted(points)
    if not pts or pts[0][1] < goal:
        return Goodput(0.0, 0.0, True, False)
    for (r0, a0), (r1, a1) in itertools.pairwise(pts):
        if a1 < goal:
            crossing = r0 + (a0 - goal) / (a0 - a1) * (r1 - r0) if a0 > a1 else r0
            return Goodput(r0, crossing, False, False)
    return Goodput(pts[-1][0], pts[-1][0], False, True)
