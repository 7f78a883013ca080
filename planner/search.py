"""Searching layouts for the most goodput per device under SLOs and a device budget.

Candidates: colocated pools of 1..N replicas of each TP/PP shape the profile has, and
disaggregated layouts of every prefill count, decode count and shape pair within the
budget, at each disaggregation threshold asked for. A replica's ranks must fit one
node (`devices_per_node`).

Each candidate first gets a capacity bound (`capacity_bound`): the request rate its
pools could sustain if every step were perfectly packed, from lower bounds on each
request's prefill work and the decode throughput of the largest batch whose step meets
the TPOT SLO. It bounds goodput from above (the tests check it on every simulated
candidate), so candidates are simulated in decreasing order of bound per device, and
the search stops (prunes the rest) once a bound per device falls below the `keep`-th
best goodput per device found. A candidate whose unloaded latency already misses an
SLO (more prompts than the goal lets fail miss TTFT alone, or the shortest sequence
alone misses TPOT) is pruned as infeasible, and a threshold that sends the same
requests of the workload's sample to the prefill pool as another is the same layout.
Goodput is then bisected on the simulator between 0 and the bound.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from planner.layout import Layout, PoolShape
from planner.metrics import GoodputResult, Slo, goodput
from planner.simulator import ClusterModel, simulate
from planner.workload import SimRequest, Workload

log = logging.getLogger(__name__)

MAX_RATE = 1e6  # requests per second: the bound of a layout with no measurable work


@dataclass(frozen=True)
class SearchSpace:
    budget_devices: int
    shapes: tuple[tuple[int, int], ...] = ((1, 1),)
    thresholds: tuple[int, ...] = (0, 64)
    devices_per_node: int | None = None
    max_batched_tokens: int = 2048
    max_num_seqs: int = 64
    colocated: bool = True
    disaggregated: bool = True

    def __post_init__(self) -> None:
        if self.budget_devices < 1:
            raise ValueError("budget_devices must be >= 1")
        if not self.shapes:
            raise ValueError("shapes: the profile has no layout")
        if any(t < 0 for t in self.thresholds) or not self.thresholds:
            raise ValueError("thresholds: need at least one, each >= 0")

    def fits(self, tp: int, pp: int) -> bool:
        return self.devices_per_node is None or tp * pp <= self.devices_per_node

    def layouts(self) -> Iterator[Layout]:
        shapes = [s for s in self.shapes if self.fits(*s)]
        limits = {"max_batched_tokens": self.max_batched_tokens, "max_num_seqs": self.max_num_seqs}
        for tp, pp in shapes if self.colocated else ():
            for n in range(1, self.budget_devices // (tp * pp) + 1):
                yield Layout(PoolShape(n, tp, pp), **limits)  # type: ignore[arg-type]
        for ptp, ppp in shapes if self.disaggregated else ():
            for dtp, dpp in shapes:
                for np_ in range(1, self.budget_devices // (ptp * ppp) + 1):
                    left = self.budget_devices - np_ * ptp * ppp
                    for nd in range(1, left // (dtp * dpp) + 1):
                        for th in self.thresholds:
                            yield Layout(
                                PoolShape(nd, dtp, dpp),
                                PoolShape(np_, ptp, ppp),
                                threshold=th,
                                **limits,  # type: ignore[arg-type]
                            )


@dataclass(frozen=True)
class Candidate:
    layout: Layout
    bound: float  # capacity bound, requests per second
    goodput: float = 0.0
    attainment: float = 0.0

    @property
    def per_device(self) -> float:
        return self.goodput / self.layout.devices

    @property
    def bound_per_device(self) -> float:
        return self.bound / self.layout.devices


@dataclass
class SearchResult:
    ranked: list[Candidate]  # simulated, best goodput per device first
    pruned: list[tuple[Layout, str]] = field(default_factory=list)
    simulations: int = 0

    @property
    def best(self) -> Candidate:
        if not self.ranked or self.ranked[0].goodput <= 0:
            raise ValueError("no layout within the budget meets the SLOs at any rate")
        return self.ranked[0]


@dataclass(frozen=True)
class _Demand:
    """Per-request work lower bounds from a sample of the workload."""

    sample: list[SimRequest]
    ctx: float  # mean context of a decoding sequence
    decode_tokens: float  # mean tokens after the first


def _demand(workload: Workload, seed: int) -> _Demand:
    sample = workload.at_rate(1.0, 2000, seed) if workload.mix else list(workload.trace)
    n = len(sample)
    ctx = sum(r.prompt_tokens + r.output_tokens / 2 for r in sample) / n
    return _Demand(sample, ctx, sum(r.output_tokens - 1 for r in sample) / n)


def capacity_bound(layout: Layout, model: ClusterModel, slo: Slo, demand: _Demand) -> float:
    """The rate `layout` could serve if every step were packed: optimistic, not a proof
    (decode assumes each step runs the largest batch whose step time meets the TPOT
    SLO at the mean context); 0 when the SLOs are out of reach even unloaded."""
    gen = layout.generating
    gcost = model.step_cost(gen.tp, gen.pp)
    pshape = layout.prefill or gen
    pcost = model.step_cost(pshape.tp, pshape.pp)
    local = [r for r in demand.sample if layout.colocated or r.uncached_tokens < layout.threshold]
    remote = [
        r for r in demand.sample if not (layout.colocated or r.uncached_tokens < layout.threshold)
    ]
    # infeasible: more prompts than the goal lets fail miss TTFT alone, or the shortest
    # sequence alone misses TPOT
    lengths = sorted((r.uncached_tokens for r in demand.sample), reverse=True)
    allowed = int(len(lengths) * (1.0 - slo.goal))
    shortest = min(r.prompt_tokens for r in demand.sample)
    if (
        pcost.prefill.prompt(lengths[min(allowed, len(lengths) - 1)]) > slo.ttft_s
        or gcost.decode.time(1, shortest) > slo.tpot_s
    ):
        return 0.0
    # the largest batch whose step meets the TPOT SLO, and its tokens per second
    batch = 1
    while (
        batch < layout.max_num_seqs
        and gcost.decode.time(batch + 1, int((batch + 1) * demand.ctx)) <= slo.tpot_s
    ):
        batch += 1
    step = gcost.decode.time(batch, int(batch * demand.ctx))
    n = len(demand.sample)

    def prefill_work(reqs: Sequence[SimRequest], shape: PoolShape, budget: int) -> float:
        # a step's fixed cost spreads over at most `budget` tokens; attention over a
        # prompt chunked any way costs at least half its square
        p = model.step_cost(shape.tp, shape.pp).prefill
        per_token = p.b + p.a / budget
        return sum(per_token * r.uncached_tokens + p.c * r.uncached_tokens**2 / 2 for r in reqs) / n

    decode_work = demand.decode_tokens * step / batch  # seconds of a replica per request
    gen_work = decode_work + prefill_work(local, gen, layout.max_batched_tokens)
    rate = gen.replicas / gen_work if gen_work > 0 else MAX_RATE
    if layout.prefill is not None and remote:
        work = prefill_work(remote, layout.prefill, layout.prefill_budget)
        rate = min(rate, layout.prefill.replicas / work if work > 0 else MAX_RATE)
    return min(rate, MAX_RATE)


def search(
    model: ClusterModel,
    workload: Workload,
    slo: Slo,
    space: SearchSpace,
    requests: int = 400,
    seed: int = 0,
    keep: int = 5,
) -> SearchResult:
    """The `keep` best layouts by simulated goodput per device (see the module doc)."""
    demand = _demand(workload, seed)
    candidates = []
    result = SearchResult([])
    routes: set[tuple[object, ...]] = set()
    for layout in space.layouts():
        # thresholds that send the same requests to the prefill pool are one layout
        local = sum(r.uncached_tokens < layout.threshold for r in demand.sample)
        key = (layout.generating, layout.prefill, None if layout.colocated else local)
        if key in routes:
            result.pruned.append((layout, "routes like another threshold"))
            continue
        routes.add(key)
        bound = capacity_bound(layout, model, slo, demand)
        if bound <= 0:
            result.pruned.append((layout, "an SLO is missed even unloaded"))
        else:
            candidates.append(Candidate(layout, bound))
    candidates.sort(key=lambda c: (-c.bound_per_device, c.layout.devices))
    for i, cand in enumerate(candidates):
        if (
            len(result.ranked) >= keep
            and cand.bound_per_device < result.ranked[keep - 1].per_device
        ):
            for rest in candidates[i:]:
                result.pruned.append((rest.layout, "capacity bound below the best found"))
            break
        found = _goodput(cand.layout, model, workload, slo, requests, seed, cand.bound)
        result.simulations += found.runs
        result.ranked.append(Candidate(cand.layout, cand.bound, found.rate, found.attainment))
        result.ranked.sort(key=lambda c: (-c.per_device, -c.goodput, c.layout.devices))
        log.info(
            "%s: goodput %.3f rps (bound %.3f)", cand.layout.describe(), found.rate, cand.bound
        )
    return result


def _goodput(
    layout: Layout,
    model: ClusterModel,
    workload: Workload,
    slo: Slo,
    requests: int,
    seed: int,
    high: float,
) -> GoodputResult:
    def attainment(rate: float) -> float:
        return simulate(layout, model, workload.at_rate(rate, requests, seed)).attainment(slo)

    return goodput(attainment, slo.goal, high)
