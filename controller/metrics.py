"""The controller's metrics, exported through Ray's metrics agent (`ray.util.metrics`,
scraped with every other Ray metric): the pressures, instance counts and demand it saw
on its last tick, the threshold and replica counts it holds, whether it holds the
cluster's lease, and its decisions by kind, applied or failed."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from controller.policy import Action, Demand, Pressures


class Metrics(Protocol):
    def tick(
        self, pressures: Pressures, demand: Demand, threshold: int, replicas: Mapping[str, int]
    ) -> None: ...

    def decided(self, action: Action) -> None: ...

    def failed(self, action: Action) -> None: ...

    def leading(self, held: bool) -> None: ...


class RayMetrics:
    """Only inside a Ray worker (the actor, or the Serve replica)."""

    def __init__(self, cluster: str) -> None:
        from ray.util.metrics import Counter, Gauge

        tags = {"cluster": cluster}
        self._pressure = Gauge(
            "pdserve_controller_pressure",
            description="Pressure of a role on the last fast tick (1.0: at capacity)",
            tag_keys=("cluster", "role"),
        )
        self._instances = Gauge(
            "pdserve_controller_instances",
            description="Instances routed in a role on the last fast tick",
            tag_keys=("cluster", "role"),
        )
        self._arrivals = Gauge(
            "pdserve_controller_arrival_rate",
            description="Requests per second the routers and Serve's proxies received over "
            "the last tick's interval, refused ones included",
            tag_keys=("cluster",),
        )
        self._refused = Counter(
            "pdserve_controller_refused",
            description="Refused requests the controller counted, by where: router (the "
            "routers' admission) or ingress (Serve's proxy, before any router)",
            tag_keys=("cluster", "where"),
        )
        self._threshold = Gauge(
            "pdserve_controller_threshold",
            description="The disaggregation threshold the controller holds",
            tag_keys=("cluster",),
        )
        self._replicas = Gauge(
            "pdserve_controller_replicas",
            description="Replicas of a pool the controller holds as Serve's target",
            tag_keys=("cluster", "pool"),
        )
        self._leader = Gauge(
            "pdserve_controller_leader",
            description="1 while this controller holds the cluster's lease and acts",
            tag_keys=("cluster",),
        )
        self._decisions = Counter(
            "pdserve_controller_decisions",
            description="Decisions applied, by kind: flip, repair, threshold, scale",
            tag_keys=("cluster", "kind"),
        )
        self._failures = Counter(
            "pdserve_controller_decision_failures",
            description="Decisions that could not be applied (Redis or Serve unreachable)",
            tag_keys=("cluster", "kind"),
        )
        for m in (
            self._pressure, self._instances, self._arrivals, self._refused, self._threshold,
            self._replicas, self._leader, self._decisions, self._failures,
        ):  # fmt: skip
            m.set_default_tags(tags)

    def tick(
        self, pressures: Pressures, demand: Demand, threshold: int, replicas: Mapping[str, int]
    ) -> None:
        self._pressure.set(pressures.prefill, tags={"role": "prefill"})
        self._pressure.set(pressures.decode, tags={"role": "decode"})
        self._instances.set(pressures.n_prefill, tags={"role": "prefill"})
        self._instances.set(pressures.n_decode, tags={"role": "decode"})
        self._arrivals.set(demand.arrival_rate)
        at_router = demand.refused - demand.refused_at_ingress
        if at_router > 0:
            self._refused.inc(at_router, tags={"where": "router"})
        if demand.refused_at_ingress > 0:
            self._refused.inc(demand.refused_at_ingress, tags={"where": "ingress"})
        self._threshold.set(threshold)
        for pool, n in replicas.items():
            self._replicas.set(n, tags={"pool": pool})

    def decided(self, action: Action) -> None:
        self._decisions.inc(tags={"kind": action.kind.value})

    def failed(self, action: Action) -> None:
        self._failures.inc(tags={"kind": action.kind.value})

    def leading(self, held: bool) -> None:
        self._leader.set(1.0 if held else 0.0)
