"""The M:N plan: every receiver rank gets each (layer, head) it owns exactly once."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest

from kv_transfer.base import Parallelism
from kv_transfer.mapping import KVGeometry, Route, plan, routes_by_layer, routes_from, routes_to

LAYOUTS = [Parallelism(tp, pp) for tp in (1, 2, 4, 8) for pp in (1, 2, 4)]


def _cells(routes: tuple[Route, ...]) -> Counter[tuple[int, int, int]]:
    """(receiver rank, layer, head) -> how many routes deliver it."""
    return Counter(
        (r.dst, layer, head)
        for r in routes
        for layer in r.layers
        for head in range(r.head_start, r.head_stop)
    )


@pytest.mark.parametrize("heads", [1, 2, 4, 8])
@pytest.mark.parametrize("src,dst", list(itertools.product(LAYOUTS, LAYOUTS)))
def test_exact_cover(heads: int, src: Parallelism, dst: Parallelism) -> None:
    geo = KVGeometry(num_layers=8, num_kv_heads=heads)
    routes = plan(geo, src, dst)
    want = Counter(
        (rank, layer, head)
        for rank in range(dst.world_size)
        for layer in geo.rank_layers(dst, rank)
        for head in geo.rank_heads(dst, rank)
    )
    assert _cells(routes) == want
    for r in routes:  # a sender only sends what it holds
        assert set(r.layers) <= set(geo.rank_layers(src, r.src))
        assert set(range(r.head_start, r.head_stop)) <= set(geo.rank_heads(src, r.src))


def test_tp1_to_tp2_splits_heads() -> None:
    geo = KVGeometry(4, 4)
    assert plan(geo, Parallelism(1, 1), Parallelism(2, 1)) == (
        Route(0, 0, 0, 4, 0, 2),
        Route(0, 1, 0, 4, 2, 4),
    )


def test_tp2_to_tp1_merges_heads() -> None:
    geo = KVGeometry(4, 4)
    assert plan(geo, Parallelism(2, 1), Parallelism(1, 1)) == (
        Route(0, 0, 0, 4, 0, 2),
        Route(1, 0, 0, 4, 2, 4),
    )


def test_pp2_to_pp1_sends_each_stage_its_layers() -> None:
    geo = KVGeometry(4, 2)
    assert plan(geo, Parallelism(1, 2), Parallelism(1, 1)) == (
        Route(0, 0, 0, 2, 0, 2),
        Route(1, 0, 2, 4, 0, 2),
    )


def test_replicated_sender_heads_spread_over_replicas() -> None:
    # 2 KV heads on TP=4: ranks 0,1 hold head 0 and ranks 2,3 hold head 1.
    geo = KVGeometry(2, 2)
    routes = plan(geo, Parallelism(4, 1), Parallelism(2, 1))
    # Receiver TP rank t takes a head from replica t % 2 of its holders.
    assert routes == (Route(0, 0, 0, 2, 0, 1), Route(3, 1, 0, 2, 1, 2))
    routes = plan(geo, Parallelism(4, 1), Parallelism(4, 1))
    # Receiver rank t takes its head from replica t % 2: all four senders work.
    assert sorted(r.src for r in routes) == [0, 1, 2, 3]
    assert {r.dst: r.src for r in routes} == {0: 0, 1: 1, 2: 2, 3: 3}


def test_replicated_receiver_heads_each_get_a_copy() -> None:
    geo = KVGeometry(2, 2)
    routes = plan(geo, Parallelism(1, 1), Parallelism(4, 1))
    assert [(r.dst, r.head_start) for r in routes] == [(0, 0), (1, 0), (2, 1), (3, 1)]


def test_routes_from_and_to_partition_the_plan() -> None:
    geo = KVGeometry(8, 4)
    src, dst = Parallelism(2, 2), Parallelism(4, 1)
    routes = plan(geo, src, dst)
    assert sorted(
        itertools.chain.from_iterable(routes_from(routes, s) for s in range(src.world_size))
    ) == sorted(routes)
    assert sorted(
        itertools.chain.from_iterable(routes_to(routes, d) for d in range(dst.world_size))
    ) == sorted(routes)


@pytest.mark.parametrize(
    "heads,layers,parallel",
    [(4, 4, Parallelism(3, 1)), (6, 4, Parallelism(4, 1)), (4, 6, Parallelism(1, 4))],
)
def test_layouts_that_do_not_divide_are_refused(
    heads: int, layers: int, parallel: Parallelism
) -> None:
    with pytest.raises(ValueError):
        plan(KVGeometry(layers, heads), parallel, Parallelism())


def test_layers_that_go_the_same_way_share_one_route_list() -> None:
    """A TP=1 sender to a TP=2, PP=2 receiver: layers 0-3 go to ranks 0 and 1, layers
    4-7 to ranks 2 and 3. Each half shares one list, so spans can grow within it."""
    geo = KVGeometry(num_layers=8, num_kv_heads=2)
    by_layer = routes_by_layer(routes_from(plan(geo, Parallelism(), Parallelism(2, 2)), 0))
    assert sorted(by_layer) == list(range(8))
    first, second = by_layer[0], by_layer[4]
    assert all(by_layer[layer] is first for layer in range(4))
    assert all(by_layer[layer] is second for layer in range(4, 8))
    assert first is not second
    assert [(r.dst, r.head_start, r.head_stop) for r in first] == [(0, 0, 1), (1, 1, 2)]
    assert [(r.dst, r.head_start, r.head_stop) for r in second] == [(2, 0, 1), (3, 1, 2)]
