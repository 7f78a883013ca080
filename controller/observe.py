"""What the controller reads each tick, turned into a `policy.Observation`.

`Snapshot` is the raw read, all of it from Redis in one round: live instances, their
load reports, the routing table, and every router's cumulative admission counts; and,
when the controller has a source for them, Serve's counts of the requests its proxies
refused before they reached a router (`controller.refusals`). It has a JSON form
(`to_json`/`from_json`), so a sequence of snapshots recorded from a running cluster
replays through the same code in tests.

`Observer.observe(snapshot)` gives the instances with the role the routing table gives
them (`routed`), and the routers' demand over the interval since the previous
snapshot: counts are cumulative per router, so the demand is the difference, and a
router that restarted (a new `started`) counts from zero. The proxies' refusals are
added to both the arrivals and the refusals, and kept apart in `refused_at_ingress`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from controller.policy import Demand, InstanceLoad, Observation
from controller.refusals import IngressCounts, IngressTally
from registry import AdmissionReport, InstanceInfo, LoadReport, Registry, Role, RoutingState
from registry.routing import ADMISSION_CODEC
from registry.types import INSTANCE_CODEC, LOAD_CODEC


@dataclass(frozen=True)
class Snapshot:
    t: float  # seconds, monotonic, when it was read
    instances: tuple[InstanceInfo, ...]
    loads: dict[str, LoadReport]
    routing: RoutingState
    admissions: dict[str, AdmissionReport]
    ingress: IngressCounts | None = None  # None: no source, or its read failed

    @staticmethod
    def read(registry: Registry, t: float, ingress: IngressCounts | None = None) -> Snapshot:
        instances = registry.live_instances()
        loads = registry.loads([i.instance_id for i in instances])
        return Snapshot(
            t,
            tuple(instances),
            loads,
            registry.routing.read(),
            registry.routing.admissions(),
            ingress,
        )

    def to_json(self) -> str:
        out: dict[str, Any] = {
            "t": self.t,
            "instances": [json.loads(INSTANCE_CODEC.encode(i)) for i in self.instances],
            "loads": {k: json.loads(LOAD_CODEC.encode(v)) for k, v in self.loads.items()},
            "roles": {k: v.value for k, v in self.routing.roles.items()},
            "threshold": self.routing.threshold,
            "admissions": [json.loads(ADMISSION_CODEC.encode(a)) for a in self.admissions.values()],
        }
        if self.ingress is not None:
            out["ingress"] = self.ingress.to_json()
        return json.dumps(out, sort_keys=True)

    @staticmethod
    def from_json(line: str) -> Snapshot:
        raw: dict[str, Any] = json.loads(line)
        admissions = [ADMISSION_CODEC.decode(json.dumps(a)) for a in raw["admissions"]]
        return Snapshot(
            float(raw["t"]),
            tuple(INSTANCE_CODEC.decode(json.dumps(i)) for i in raw["instances"]),
            {k: LOAD_CODEC.decode(json.dumps(v)) for k, v in raw["loads"].items()},
            RoutingState({k: Role(v) for k, v in raw["roles"].items()}, raw["threshold"]),
            {a.router_id: a for a in admissions},
            IngressCounts.from_json(raw["ingress"]) if "ingress" in raw else None,
        )


def routed_role(info: InstanceInfo, routing: RoutingState) -> Role:
    """The role the router gives the instance (as `router.cluster_view` does)."""
    role = routing.roles.get(info.instance_id)
    return role if role is not None and info.switchable else info.role


class Observer:
    def __init__(self) -> None:
        self._previous: dict[str, AdmissionReport] = {}
        self._previous_t: float | None = None
        self._ingress = IngressTally()

    def observe(self, snap: Snapshot) -> Observation:
        instances = []
        for info in snap.instances:
            load = snap.loads.get(info.instance_id)
            instances.append(
                InstanceLoad(
                    instance_id=info.instance_id,
                    pool=info.pool,
                    home=info.role,
                    role=routed_role(info, snap.routing),
                    switchable=info.switchable,
                    queued_prefill_tokens=load.queued_prefill_tokens if load else 0,
                    running_seqs=load.running_seqs if load else 0,
                )
            )
        demand = self._demand(snap)
        return Observation(snap.t, tuple(instances), demand)

    def _demand(self, snap: Snapshot) -> Demand:
        totals = [0, 0, 0, 0, 0]  # arrived, refused, finished, tpot count, remote count
        sums = [0.0, 0.0, 0.0, 0.0]  # queue, ttft, tpot, remote queue
        for rid, now in snap.admissions.items():
            before = self._previous.get(rid)
            if before is None or before.started != now.started:
                before = AdmissionReport(router_id=rid, started=now.started, ts=now.started)
            totals[0] += max(0, now.arrived - before.arrived)
            totals[1] += max(0, now.refused - before.refused)
            totals[2] += max(0, now.finished - before.finished)
            totals[3] += max(0, now.tpot_count - before.tpot_count)
            totals[4] += max(0, now.remote_count - before.remote_count)
            sums[3] += max(0.0, now.remote_queue_s - before.remote_queue_s)
            sums[0] += max(0.0, now.queue_s - before.queue_s)
            sums[1] += max(0.0, now.ttft_s - before.ttft_s)
            sums[2] += max(0.0, now.tpot_s - before.tpot_s)
        first = self._previous_t is None
        interval = 0.0 if self._previous_t is None else snap.t - self._previous_t
        self._previous = dict(snap.admissions)
        self._previous_t = snap.t
        at_ingress = self._ingress.refused(snap.ingress)
        if first:  # counts since each router started: no interval to rate them over
            return Demand()
        finished, tpots, remote = totals[2], totals[3], totals[4]
        return Demand(
            interval_s=interval,
            arrived=totals[0] + at_ingress,
            refused=totals[1] + at_ingress,
            refused_at_ingress=at_ingress,
            finished=finished,
            mean_queue_s=sums[0] / finished if finished else None,
            mean_remote_queue_s=sums[3] / remote if remote else None,
            mean_ttft_s=sums[1] / finished if finished else None,
            mean_tpot_s=sums[2] / tpots if tpots else None,
        )
