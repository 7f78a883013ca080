"""Workloads: traces round-trip and name their bad lines, replay at another rate by
scaling time only, and mixes draw the same lengths at every rate under one seed."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.workload import Mix
from planner.workload import SimRequest, Workload, read_trace, write_trace


def test_trace_round_trip_and_rate_scaling(tmp_path: Path) -> None:
    reqs = [SimRequest(2.0 * i, 100 + i, 5, 16 if i % 2 else 0) for i in range(5)]
    path = tmp_path / "t.csv"
    write_trace(path, reqs)
    assert read_trace(path) == reqs
    workload = Workload.from_trace(path)
    assert workload.trace_rate == pytest.approx(0.5)
    faster = workload.at_rate(2.0, 5, seed=0)
    assert [r.arrival for r in faster] == pytest.approx([0.5 * i for i in range(5)])
    assert [r.prompt_tokens for r in faster] == [r.prompt_tokens for r in reqs]
    assert workload.mean_lengths() == pytest.approx((102 - 32 / 5, 5.0))


def test_bad_trace_lines_are_named(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("arrival_s,prompt_tokens,output_tokens\n0,10,2\n1,0,2\n")
    with pytest.raises(ValueError, match=r"bad\.csv:3: .*prompt_tokens"):
        read_trace(path)
    path.write_text("arrival_s,prompt_tokens\n0,10\n")
    with pytest.raises(ValueError, match="missing columns"):
        read_trace(path)


def test_mix_draws_the_same_lengths_at_every_rate() -> None:
    workload = Workload.from_mix(Mix.named("sharegpt"))
    slow, fast = workload.at_rate(1.0, 50, seed=9), workload.at_rate(4.0, 50, seed=9)
    assert [(r.prompt_tokens, r.output_tokens) for r in slow] == [
        (r.prompt_tokens, r.output_tokens) for r in fast
    ]
    assert [r.arrival / 4 for r in slow] == pytest.approx([r.arrival for r in fast])
    assert workload.at_rate(1.0, 50, seed=10) != slow
    with pytest.raises(ValueError, match="prefix_hit"):
        Workload.from_mix(Mix.named("short"), prefix_hit=1.0)
