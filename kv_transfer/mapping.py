"""The M:N plan: which (layer range x KV-head range) each sender rank sends each receiver rank.

Sharding rules (the engine's TP/PP split follows the same ones):

* PP stage `s` of `pp` owns layers `[s * L/pp, (s+1) * L/pp)`; `pp` must divide L.
* With `H >= tp` KV heads, TP rank `t` owns heads `[t * H/tp, (t+1) * H/tp)`; `tp` must
  divide H. With `H < tp` (GQA with fewer KV heads than ranks), `H` must divide `tp`
  and each head is replicated on `tp/H` consecutive ranks: rank `t` owns head
  `t // (tp/H)`.

Every receiver rank gets each (layer, head) it owns from exactly one sender rank, so no
byte is sent twice to the same rank and nothing a rank does not own is sent. When the
sender replicates a head, receiver TP rank `t` takes it from replica `t mod (tp/H)`,
which spreads the load over the replicas.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from itertools import groupby

from kv_transfer.base import Parallelism


@dataclass(frozen=True)
class KVGeometry:
    """The whole model's KV shape, which every layout shards."""

    num_layers: int
    num_kv_heads: int

    def __post_init__(self) -> None:
        if self.num_layers < 1 or self.num_kv_heads < 1:
            raise ValueError(f"num_layers and num_kv_heads must be >= 1: {self}")

    def check(self, parallel: Parallelism) -> None:
        """Raise ValueError unless `parallel` can shard this model."""
        if self.num_layers % parallel.pp:
            raise ValueError(f"pp={parallel.pp} does not divide num_layers={self.num_layers}")
        h, tp = self.num_kv_heads, parallel.tp
        if h % tp and tp % h:
            raise ValueError(f"tp={tp} and num_kv_heads={h}: neither divides the other")

    def layers(self, parallel: Parallelism, pp_rank: int) -> range:
        """The global layer indices a PP stage owns."""
        self.check(parallel)
        per = self.num_layers // parallel.pp
        return range(pp_rank * per, (pp_rank + 1) * per)

    def heads(self, parallel: Parallelism, tp_rank: int) -> range:
        """The global KV-head indices a TP rank owns (one replicated head when H < tp)."""
        self.check(parallel)
        h, tp = self.num_kv_heads, parallel.tp
        if h >= tp:
            per = h // tp
            return range(tp_rank * per, (tp_rank + 1) * per)
        head = tp_rank // (tp // h)
        return range(head, head + 1)

    def rank_layers(self, parallel: Parallelism, rank: int) -> range:
        return self.layers(parallel, parallel.coords(rank)[1])

    def rank_heads(self, parallel: Parallelism, rank: int) -> range:
        return self.heads(parallel, parallel.coords(rank)[0])


@dataclass(frozen=True, order=True)
class Route:
    """Sender rank `src` sends receiver rank `dst` layers x heads (global indices)."""

    src: int
    dst: int
    layer_start: int
    layer_stop: int
    head_start: int
    head_stop: int

    @property
    def layers(self) -> range:
        return range(self.layer_start, self.layer_stop)

    @property
    def num_heads(self) -> int:
        return self.head_stop - self.head_start


def _source_tp_rank(geo: KVGeometry, src: Parallelism, head: int, dst_tp_rank: int) -> int:
    h, tp = geo.num_kv_heads, src.tp
    if h >= tp:
        return head // (h // tp)
    replicas = tp // h
    return head * replicas + dst_tp_rank % replicas


@functools.lru_cache(maxsize=256)  # one per pair of layouts in practice; routes are frozen
def plan(geo: KVGeometry, src: Parallelism, dst: Parallelism) -> tuple[Route, ...]:
    """Every route from a `src`-sharded instance to a `dst`-sharded one, sorted."""
    geo.check(src)
    geo.check(dst)
    routes: list[Route] = []
    for dst_rank in range(dst.world_size):
        dst_tp, dst_pp = dst.coords(dst_rank)
        want_layers = geo.layers(dst, dst_pp)
        want_heads = geo.heads(dst, dst_tp)
        for src_pp in range(src.pp):
            have = geo.layers(src, src_pp)
            lo, hi = max(have.start, want_layers.start), min(have.stop, want_layers.stop)
            if lo >= hi:
                continue
            # Consecutive heads that come from the same sender TP rank form one route.
            for src_tp, group in groupby(
                want_heads, key=lambda head: _source_tp_rank(geo, src, head, dst_tp)
            ):
                heads = list(group)
                routes.append(
                    Route(src.rank(src_tp, src_pp), dst_rank, lo, hi, heads[0], heads[-1] + 1)
                )
    return tuple(sorted(routes))


def routes_from(routes: tuple[Route, ...], src_rank: int) -> tuple[Route, ...]:
    return tuple(r for r in routes if r.src == src_rank)


def routes_to(routes: tuple[Route, ...], dst_rank: int) -> tuple[Route, ...]:
    return tuple(r for r in routes if r.dst == dst_rank)


def routes_by_layer(routes: tuple[Route, ...]) -> dict[int, list[Route]]:
    """A sender rank's routes by layer. Layers whose routes send the same heads to the
    same ranks share one list, so that consecutive layers that can travel together are
    found by comparing lists by identity."""
    by_layer: dict[int, list[Route]] = {}
    for route in routes:
        for layer in route.layers:
            by_layer.setdefault(layer, []).append(route)
    shared: dict[tuple[tuple[int, int, int], ...], list[Route]] = {}
    for layer, layer_routes in by_layer.items():
        shape = tuple((r.dst, r.head_start, r.head_stop) for r in layer_routes)
        by_layer[layer] = shared.setdefault(shape, layer_routes)
    return by_layer
