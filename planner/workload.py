"""What the simulator replays: requests with an arrival time, a prompt length, an
output length and how many leading prompt tokens a prefix cache already holds.

A `Workload` is either a length mix (`benchmarks.workload.Mix`) with Poisson arrivals,
or a trace file. `at_rate(rate, n, seed)` draws one run: the same seed gives the same
lengths and the same unit-rate arrival gaps scaled by 1/rate, so runs at different
rates differ only in their time scale (common random numbers, which keeps attainment
against rate close to monotone for a bisection).

A trace is a CSV file with a header and the columns `arrival_s,prompt_tokens,
output_tokens` (optionally `cached_tokens`). Replayed at another rate, its arrival
times are scaled; its lengths never change.
"""

from __future__ import annotations

import csv
import math
import random
from dataclasses import dataclass
from pathlib import Path

from benchmarks.workload import Mix


@dataclass(frozen=True)
class SimRequest:
    arrival: float
    prompt_tokens: int
    output_tokens: int
    cached_tokens: int = 0

    def __post_init__(self) -> None:
        if self.prompt_tokens < 1 or self.output_tokens < 1:
            raise ValueError(f"prompt_tokens and output_tokens must be >= 1: {self}")
        if not 0 <= self.cached_tokens < self.prompt_tokens:
            raise ValueError(f"cached_tokens must be in [0, prompt_tokens): {self}")
        if self.arrival < 0 or not math.isfinite(self.arrival):
            raise ValueError(f"arrival must be finite and >= 0: {self}")

    @property
    def uncached_tokens(self) -> int:
        return self.prompt_tokens - self.cached_tokens


@dataclass(frozen=True)
class Workload:
    """A mix with Poisson arrivals, or a trace; see the module docstring."""

    name: str
    mix: Mix | None = None
    trace: tuple[SimRequest, ...] = ()
    prefix_hit: float = 0.0  # share of each prompt a prefix cache holds (mixes only)
    block_size: int = 16  # cached tokens come in whole blocks

    def __post_init__(self) -> None:
        if (self.mix is None) == (not self.trace):
            raise ValueError("a workload is a mix or a trace, exactly one of them")
        if not 0.0 <= self.prefix_hit < 1.0:
            raise ValueError(f"prefix_hit must be in [0, 1), got {self.prefix_hit}")

    @classmethod
    def from_mix(cls, mix: Mix, prefix_hit: float = 0.0, block_size: int = 16) -> Workload:
        return cls(mix.describe(), mix=mix, prefix_hit=prefix_hit, block_size=block_size)

    @classmethod
    def from_trace(cls, path: str | Path) -> Workload:
        return cls(f"trace {Path(path).name}", trace=tuple(read_trace(path)))

    @property
    def trace_rate(self) -> float:
        """A trace's own mean arrival rate (requests per second)."""
        span = self.trace[-1].arrival - self.trace[0].arrival if self.trace else 0.0
        return (len(self.trace) - 1) / span if span > 0 else math.inf

    def mean_lengths(self, seed: int = 0, samples: int = 4000) -> tuple[float, float]:
        """Mean uncached prompt tokens and mean output tokens."""
        reqs = self.at_rate(1.0, samples, seed) if self.mix is not None else list(self.trace)
        n = len(reqs)
        return (sum(r.uncached_tokens for r in reqs) / n, sum(r.output_tokens for r in reqs) / n)

    def at_rate(self, rate: float, n: int, seed: int) -> list[SimRequest]:
        """`n` requests arriving at `rate` per second on average."""
        if rate <= 0 or n < 1:
            raise ValueError("rate must be > 0 and n >= 1")
        if self.mix is None:
            return self._trace_at(rate, n)
        lengths = random.Random(seed)
        gaps = random.Random(seed + 7919)
        out, t = [], 0.0
        for _ in range(n):
            prompt = self.mix.prompt.sample(lengths)
            output = self.mix.output.sample(lengths)
            cached = int(prompt * self.prefix_hit) // self.block_size * self.block_size
            out.append(SimRequest(t, prompt, output, min(cached, prompt - 1)))
            t += gaps.expovariate(1.0) / rate
        return out

    def _trace_at(self, rate: float, n: int) -> list[SimRequest]:
        scale = self.trace_rate / rate if math.isfinite(self.trace_rate) else 0.0
        t0 = self.trace[0].arrival
        return [
            SimRequest((r.arrival - t0) * scale, r.prompt_tokens, r.output_tokens, r.cached_tokens)
            for r in self.trace[:n]
        ]


def read_trace(path: str | Path) -> list[SimRequest]:
    """Requests from a CSV trace, sorted by arrival; errors name the line and field."""
    out = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"arrival_s", "prompt_tokens", "output_tokens"} - set(reader.fieldnames or [])
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        for line, row in enumerate(reader, start=2):
            try:
                out.append(
                    SimRequest(
                        float(row["arrival_s"]),
                        int(row["prompt_tokens"]),
                        int(row["output_tokens"]),
                        int(row.get("cached_tokens") or 0),
                    )
                )
            except ValueError as e:
                raise ValueError(f"{path}:{line}: {e}") from None
    if not out:
        raise ValueError(f"{path}: no requests")
    return sorted(out, key=lambda r: r.arrival)


def write_trace(path: str | Path, requests: list[SimRequest]) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["arrival_s", "prompt_tokens", "output_tokens", "cached_tokens"])
        for r in requests:
            w.writerow([f"{r.arrival:.6f}", r.prompt_tokens, r.output_tokens, r.cached_tokens])
