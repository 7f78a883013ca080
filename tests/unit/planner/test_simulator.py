"""The simulator against cases whose answer is known by hand: M/D/1 and D/D/1 queues,
one decode batch step by step, a transfer's place in TTFT, the threshold and prefix
hits."""

from __future__ import annotations

import math

import pytest

from benchmarks.workload import Mix
from planner.costs import DecodeCost, PrefillCost, StepCost, TransferCost
from planner.layout import Layout, PoolShape
from planner.metrics import Slo, goodput
from planner.simulator import ClusterModel, simulate
from planner.workload import SimRequest, Workload


def model(prefill: PrefillCost, decode: DecodeCost, **kw: object) -> ClusterModel:
    return ClusterModel(lambda tp, pp: StepCost(prefill, decode), **kw)  # type: ignore[arg-type]


# a prompt of 100 tokens takes exactly 0.1 s; a decode step 0.01 s
FIXED = model(PrefillCost(0.1, 0.0, 0.0), DecodeCost(0.01, 0.0, 0.0))
ONE_AT_A_TIME = Layout(PoolShape(1), max_batched_tokens=100, max_num_seqs=1)


@pytest.mark.parametrize("rho", [0.3, 0.5, 0.7])
def test_single_queue_matches_md1_waiting_time(rho: float) -> None:
    """Poisson arrivals, deterministic service D = 0.1 s, one server, one prompt per
    step: mean wait W = rho / (2 mu (1 - rho)) (Pollaczek-Khinchine for M/D/1)."""
    mu = 10.0
    workload = Workload.from_mix(Mix.parse("fixed:100", "fixed:1"))
    result = simulate(ONE_AT_A_TIME, FIXED, workload.at_rate(rho * mu, 20000, seed=3))
    wait = result.mean_ttft() - 1 / mu
    expected = rho / (2 * mu * (1 - rho))
    assert wait == pytest.approx(expected, rel=0.06)


def test_deterministic_queue_is_exact() -> None:
    """D/D/1: arrivals every 0.25 s, service 0.1 s -> nobody waits; arrivals every
    0.05 s -> request i waits i * (0.1 - 0.05) exactly."""
    unloaded = [SimRequest(0.25 * i, 100, 1) for i in range(50)]
    result = simulate(ONE_AT_A_TIME, FIXED, unloaded)
    assert [r.ttft for r in result.requests] == pytest.approx([0.1] * 50, abs=1e-12)
    overloaded = [SimRequest(0.05 * i, 100, 1) for i in range(50)]
    result = simulate(ONE_AT_A_TIME, FIXED, overloaded)
    expected = [0.1 + i * 0.05 for i in range(50)]
    assert [r.ttft for r in result.requests] == pytest.approx(expected, abs=1e-9)


def test_decode_batch_step_by_step() -> None:
    """One request decodes alone at a + b + c * context per step; a second one arriving
    during the first's prefill is prefilled in the next step next to the first's
    decode token (a mixed step pays the fixed cost once), then both decode together."""
    decode = DecodeCost(0.01, 0.001, 1e-5)
    m = model(PrefillCost(0.1, 0.0, 0.0), decode)
    layout = Layout(PoolShape(1), max_batched_tokens=200, max_num_seqs=8)
    alone = simulate(layout, m, [SimRequest(0.0, 100, 3)]).requests[0]
    steps = [decode.time(1, 101), decode.time(1, 102)]
    assert alone.ttft == pytest.approx(0.1)
    assert alone.tpot == pytest.approx(sum(steps) / 2)
    assert alone.e2e == pytest.approx(0.1 + sum(steps))

    first, second = simulate(
        layout, m, [SimRequest(0.0, 100, 3), SimRequest(0.05, 100, 3)]
    ).requests
    mixed = 0.1 + decode.time(1, 101) - 0.01  # second's prompt + first's token 2
    both = decode.time(2, 102 + 101)  # first's token 3, second's token 2
    last = decode.time(1, 102)  # second's token 3
    assert second.ttft == pytest.approx(0.1 + mixed - 0.05)
    assert first.e2e == pytest.approx(0.1 + mixed + both)
    assert second.tpot == pytest.approx((both + last) / 2)


def test_disaggregated_ttft_includes_the_transfer_and_threshold_keeps_short_prompts() -> None:
    transfer = TransferCost(0.002, 1e-9)
    m = model(
        PrefillCost(0.0, 0.001, 0.0),
        DecodeCost(0.01, 0.0, 0.0),
        transfer=transfer,
        kv_bytes_per_token=1000,
    )
    layout = Layout(PoolShape(1), PoolShape(1), threshold=64)
    long, short = SimRequest(0.0, 500, 2), SimRequest(10.0, 32, 2)
    result = simulate(layout, m, [long, short])
    remote, local = result.requests
    assert not remote.local_prefill and local.local_prefill
    assert remote.ttft == pytest.approx(0.5 + transfer.time(500 * 1000))
    assert local.ttft == pytest.approx(0.032)


def test_prefix_hits_cut_prefill_tokens() -> None:
    m = model(PrefillCost(0.0, 0.001, 0.0), DecodeCost(0.01, 0.0, 0.0))
    layout = Layout(PoolShape(1), max_batched_tokens=4096)
    cold = Workload.from_mix(Mix.parse("fixed:512", "fixed:2"))
    warm = Workload.from_mix(Mix.parse("fixed:512", "fixed:2"), prefix_hit=0.75)
    reqs = warm.at_rate(0.01, 5, seed=1)
    assert {r.cached_tokens for r in reqs} == {384}
    assert simulate(layout, m, reqs).mean_ttft() == pytest.approx(0.128)
    assert simulate(layout, m, cold.at_rate(0.01, 5, seed=1)).mean_ttft() == pytest.approx(0.512)


def test_colocated_chunked_prefill_splits_under_the_budget() -> None:
    """Budget 256 with one running decode: a 600-token prompt takes chunks of 255,
    255 and 90 while the other request decodes next to it."""
    m = model(PrefillCost(0.0, 0.001, 0.0), DecodeCost(0.01, 0.0, 0.0))
    layout = Layout(PoolShape(1), max_batched_tokens=256, max_num_seqs=8)
    first, second = SimRequest(0.0, 100, 50), SimRequest(0.05, 600, 2)
    result = simulate(layout, m, [first, second])
    # the first prompt takes 0.1 s; then three mixed steps (the prefill's fixed cost is 0)
    mixed = [0.255 + 0.01, 0.255 + 0.01, 0.09 + 0.01]
    assert result.requests[1].ttft == pytest.approx(0.1 + sum(mixed) - 0.05)
    assert result.requests[0].tpot == pytest.approx((sum(mixed) + 46 * 0.01) / 49)


def test_same_seed_same_result_and_goodput_bisection() -> None:
    m = model(PrefillCost(0.01, 1e-4, 0.0), DecodeCost(0.01, 1e-4, 1e-7))
    workload = Workload.from_mix(Mix.named("prompt-heavy"))
    layout = Layout(PoolShape(1), PoolShape(1), threshold=0)
    a = simulate(layout, m, workload.at_rate(3.0, 300, seed=5))
    b = simulate(layout, m, workload.at_rate(3.0, 300, seed=5))
    assert a == b
    slo = Slo(0.5, 0.05, 90)

    def att(rate: float) -> float:
        return simulate(layout, m, workload.at_rate(rate, 300, seed=5)).attainment(slo)

    found = goodput(att, slo.goal, high=100.0)
    assert 0 < found.rate < 100 and found.attainment >= 0.9
    assert att(found.rate * 1.1) < 0.9 or att(found.rate * 1.2) < 0.9
    assert math.isclose(goodput(att, slo.goal, high=found.rate / 2).rate, found.rate / 2)


def test_prefill_first_replica_with_full_seats_still_decodes() -> None:
    """Without mixed steps, a prompt that finds every seat taken waits while the
    running sequences decode, instead of stalling the replica."""
    layout = Layout(PoolShape(1), max_batched_tokens=100, max_num_seqs=2, mixed_steps=False)
    reqs = [SimRequest(0.001 * i, 100, 5) for i in range(6)]
    result = simulate(layout, FIXED, reqs)
    # pairs go through in turn: two prompts (0.1 s each, one step per prompt budget),
    # then 4 decode steps of 0.01 s for both
    ends = sorted(r.arrival + r.e2e for r in result.requests)
    assert ends == pytest.approx([0.24, 0.24, 0.48, 0.48, 0.72, 0.72])
