"""Per-request latencies from stream clock readings, percentiles, SLO attainment and
DistServe goodput over a sweep."""

from __future__ import annotations

import math

import pytest

from benchmarks.slo import RateSummary, Slo, StreamRecord, goodput, percentile


def record(sent: float, chunks: list[tuple[float, int]], ok: bool = True) -> StreamRecord:
    rec = StreamRecord(prompt_tokens=100, output_len=sum(n for _, n in chunks), sent=sent)
    for at, n in chunks:
        rec.chunk(n, now=at)
    if ok:
        rec.finish()
    else:
        rec.fail("UNAVAILABLE: gone")
    return rec


def test_latencies_from_chunks() -> None:
    # sent at 10.0; token 1 at 12.0; tokens 2-3 together at 12.3; token 4 at 12.4
    r = record(10.0, [(12.0, 1), (12.3, 2), (12.4, 1)])
    assert r.ok and r.output_tokens == 4
    assert r.ttft == pytest.approx(2.0)
    assert r.e2e == pytest.approx(2.4)
    assert r.tpot == pytest.approx(0.4 / 3)
    assert r.itls() == pytest.approx([0.15, 0.15, 0.1])  # one ITL per token after the first


def test_single_token_and_failed_requests() -> None:
    one = record(0.0, [(1.0, 1)])
    assert one.tpot is None and one.itls() == []
    assert Slo(2.0, 0.01).meets(one)  # no TPOT to miss
    failed = record(0.0, [(0.5, 1), (0.6, 1)], ok=False)
    assert not failed.ok
    assert not Slo(10.0, 10.0).meets(failed)
    unfinished = StreamRecord(10, 5)
    unfinished.chunk(2)
    assert not unfinished.ok


def test_percentile_interpolates_like_numpy() -> None:
    xs = [1.0, 2.0, 3.0, 4.0]
    assert percentile(xs, 50) == 2.5
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([5.0], 90) == 5.0
    assert math.isnan(percentile([], 50))


def test_attainment_counts_failures_as_misses() -> None:
    slo = Slo(ttft_s=1.0, tpot_s=0.1)
    fast = record(0.0, [(0.5, 1), (0.55, 1)])
    slow_first = record(0.0, [(1.5, 1), (1.55, 1)])
    slow_decode = record(0.0, [(0.5, 1), (0.9, 1)])
    failed = record(0.0, [(0.5, 1)], ok=False)
    s = RateSummary.of(1.0, [fast, slow_first, slow_decode, failed], slo)
    assert (s.sent, s.ok) == (4, 3)
    assert s.attainment == 0.25
    assert s.ttft_attainment == 0.5
    assert s.tpot_attainment == 0.5
    assert s.ttft.count == 3 and s.ttft.p_ms[50] == pytest.approx(500.0)


def test_goodput_walks_up_and_interpolates() -> None:
    g = goodput([(0.1, 1.0), (0.2, 0.95), (0.3, 0.85), (0.4, 0.95)], goal=0.9)
    assert g.rate == 0.2  # stops at the first rate that misses, despite 0.4
    assert g.interpolated == pytest.approx(0.25)
    assert not g.below_sweep and not g.above_sweep


def test_goodput_outside_the_sweep() -> None:
    below = goodput([(0.1, 0.5), (0.2, 0.2)])
    assert below.below_sweep and below.rate == 0.0
    above = goodput([(0.2, 0.95), (0.1, 1.0)])
    assert above.above_sweep and above.rate == 0.2
    assert "<" in below.describe() and ">=" in above.describe()
