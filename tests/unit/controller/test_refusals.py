"""Requests Serve's proxy refused before the router saw them, as the controller counts
them: from two scrapes recorded on local Ray (tests/integration/cluster/
test_ingress_refusals.py: a burst of 8 clients against an ingress with
`max_queued_requests=1`, of which Serve refused 6, then 3 requests the deployment
refused itself and counted as the router does), and from hand-made counts: a router's
refusal exported before or after the proxy's answer to it, a restarted process, a
failed scrape. The observer adds them to the demand, and they alone make the slow loop
add a replica."""

from __future__ import annotations

import json
from pathlib import Path

from controller.observe import Observer, Snapshot
from controller.policy import ActionKind, InstanceLoad, Observation, Policy
from controller.refusals import IngressCounts, IngressTally
from controller.settings import PlannerConfig
from registry import Role, RoutingState

HERE = Path(__file__).parent / "recorded"


def test_the_recorded_scrapes_give_the_proxys_refusals() -> None:
    setup = json.loads((HERE / "ingress.json").read_text())
    before = IngressCounts.parse([(HERE / "ingress-before.prom").read_text()], setup["app"])
    after = IngressCounts.parse([(HERE / "ingress-after.prom").read_text()], setup["app"])
    assert len(after.proxy) == 1 and len(after.router) == 1  # one proxy, one "router"
    assert sum(after.proxy.values()) - sum(before.proxy.values()) == setup["at_proxy"] + 3
    tally = IngressTally()
    assert tally.refused(before) == 0  # the first counts are the baseline
    assert tally.refused(after) == setup["at_proxy"] == 6
    assert tally.refused(after) == 0
    assert IngressCounts.parse([(HERE / "ingress-after.prom").read_text()], "other").proxy == {}


def _counts(proxy: float, router: float, proxy_key: str = "p0") -> IngressCounts:
    return IngressCounts({proxy_key: proxy}, {"r0": router})


def test_lag_between_the_two_exports_neither_invents_nor_loses_refusals() -> None:
    tally = IngressTally()
    assert tally.refused(_counts(10, 4)) == 0
    # The router's 2 refusals are exported, the proxy's answers to them not yet.
    assert tally.refused(_counts(10, 6)) == 0
    # Now the proxy's answers arrive, with 3 refusals of its own.
    assert tally.refused(_counts(15, 6)) == 3
    # The proxy's answers to 2 refusals of the router's are exported first: for now
    # they count as the proxy's; once the router's export catches up, the next 2 of
    # the proxy's own go uncounted, so the total stays exact.
    assert tally.refused(_counts(17, 6)) == 2
    assert tally.refused(_counts(17, 8)) == 0
    assert tally.refused(_counts(18, 8)) == 0
    assert tally.refused(_counts(20, 8)) == 1  # 3 + 2 + 1 = the proxy's 6 in all
    # A proxy that restarted counts from zero under a new series; a failed scrape: 0.
    assert tally.refused(None) == 0
    assert tally.refused(IngressCounts({"p0": 20, "p1": 4}, {"r0": 8})) == 4
    assert tally.refused(IngressCounts({"p1": 1}, {"r0": 8})) == 1  # p1 restarted too


def _snap(t: float, ingress: IngressCounts | None) -> Snapshot:
    return Snapshot(t, (), {}, RoutingState({}, None), {}, ingress)


def test_the_observer_adds_them_to_the_demand_and_they_survive_a_recording() -> None:
    observer = Observer()
    snaps = [_snap(0.0, _counts(5, 5)), _snap(2.0, _counts(12, 6))]
    replayed = [Snapshot.from_json(s.to_json()) for s in snaps]
    assert replayed == snaps
    assert Snapshot.from_json(_snap(0.0, None).to_json()).ingress is None
    observer.observe(replayed[0])
    demand = observer.observe(replayed[1]).demand
    assert (demand.arrived, demand.refused, demand.refused_at_ingress) == (6, 6, 6)
    assert demand.arrival_rate == 3.0


def test_refusals_at_the_ingress_alone_add_a_replica() -> None:
    planner = {"enabled": True, "scaling": True, "scale_cooldown_s": 0, "slow_period_s": 1}
    cfg = PlannerConfig.model_validate({**planner, "fast_period_s": 1})
    pol = Policy(cfg, "prefill", "decode", {"prefill": 1, "decode": 1}, 64)
    instances = (
        InstanceLoad("p0", "prefill", Role.PREFILL, Role.PREFILL, True, 0, 0),
        InstanceLoad("d0", "decode", Role.DECODE, Role.DECODE, True, 0, 0),
    )
    observer = Observer()
    for t, counts in ((0.0, _counts(0, 0)), (1.0, _counts(4, 0))):
        snap = _snap(t, counts)
        obs = observer.observe(snap)
        obs = Observation(obs.t, instances, obs.demand)
        pol.fast(obs)
    (scale,) = pol.slow(obs)
    assert scale.kind is ActionKind.SCALE and scale.replicas == (1, 2)
    assert scale.record()["refused_at_ingress"] == 4
