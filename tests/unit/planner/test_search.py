"""Layout search: the capacity bound is an upper bound, pruning never drops the best
layout, infeasible layouts are cut before any simulation, and the space respects the
budget and node size."""

from __future__ import annotations

from benchmarks.workload import Mix
from planner.costs import DecodeCost, PrefillCost, StepCost
from planner.layout import Layout, PoolShape
from planner.metrics import Slo
from planner.search import SearchSpace, search
from planner.simulator import ClusterModel
from planner.workload import Workload

# prefill-heavy: a 512-token prompt takes 0.1 s; a decode step 10-20 ms
COSTS = {
    (1, 1): StepCost(PrefillCost(0.01, 1.7e-4, 0.0), DecodeCost(0.01, 2e-4, 1e-7)),
    (2, 1): StepCost(PrefillCost(0.012, 0.9e-4, 0.0), DecodeCost(0.008, 1.2e-4, 0.6e-7)),
}
MODEL = ClusterModel(lambda tp, pp: COSTS[(tp, pp)])
WORKLOAD = Workload.from_mix(Mix.parse("uniform:256:768", "uniform:16:48"))
SLO = Slo(0.5, 0.05, 90)


def test_space_respects_budget_and_node_size() -> None:
    space = SearchSpace(4, shapes=((1, 1), (2, 1)), thresholds=(0, 64), devices_per_node=1)
    layouts = list(space.layouts())
    assert layouts and all(lay.devices <= 4 for lay in layouts)
    assert all(lay.generating.tp == 1 for lay in layouts)  # tp=2 needs 2 per node
    n_coloc = sum(lay.colocated for lay in layouts)
    assert n_coloc == 4
    # (np, nd) with np + nd <= 4: 6 pairs, times 2 thresholds
    assert len(layouts) - n_coloc == 12


def test_pruning_keeps_the_exhaustive_best() -> None:
    space = SearchSpace(4, shapes=((1, 1), (2, 1)), thresholds=(0,))
    pruned = search(MODEL, WORKLOAD, SLO, space, requests=300, keep=1)
    full = search(MODEL, WORKLOAD, SLO, space, requests=300, keep=10_000)
    assert pruned.best.layout == full.best.layout
    assert pruned.pruned and not [r for _, r in full.pruned if r.startswith("capacity")]
    assert pruned.simulations < full.simulations
    best = full.best.per_device
    for layout, reason in pruned.pruned:
        assert reason.startswith("capacity")
        match = next(c for c in full.ranked if c.layout == layout)
        assert match.per_device <= best
    for cand in full.ranked:  # the bound is an upper bound
        assert cand.goodput <= cand.bound + 1e-9


def test_layouts_that_miss_an_slo_unloaded_are_cut_without_simulation() -> None:
    tight = Slo(0.05, 0.05, 90)  # no 256+ token prompt prefills in 50 ms
    result = search(MODEL, WORKLOAD, tight, SearchSpace(2, thresholds=(0,)), requests=100)
    assert not result.ranked and result.simulations == 0
    assert all(reason.startswith("an SLO") for _, reason in result.pruned)
    assert len(result.pruned) == 3  # colocated x1, x2 and 1P1D


def test_search_picks_disaggregation_on_the_distserve_example() -> None:
    """On DistServe's toy example, one prefill + one decode GPU beats one or two
    colocated GPUs per device (the paper: 2.1x)."""
    from planner import distserve

    space = SearchSpace(2, thresholds=(0,), max_num_seqs=256)
    result = search(distserve.MODEL, distserve.WORKLOAD, distserve.SLO, space, requests=300)
    assert result.best.layout == Layout(PoolShape(1), PoolShape(1), threshold=0, max_num_seqs=256)
    colocated = [c.per_device for c in result.ranked if c.layout.colocated]
    assert colocated and max(colocated) * 1.3 < result.best.per_device


def test_thresholds_that_route_alike_are_simulated_once() -> None:
    space = SearchSpace(2, thresholds=(0, 64, 512), colocated=False)
    result = search(MODEL, WORKLOAD, SLO, space, requests=100, keep=10)
    # every prompt has 256+ tokens: 0 and 64 route alike, 512 keeps some local
    assert [r for _, r in result.pruned] == ["routes like another threshold"]
    assert sorted(c.layout.threshold for c in result.ranked) == [0, 512]
