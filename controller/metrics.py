"""The controller's metrics, exported through Ray's metrics agent (`ray.util.metrics`,
scraped with every other Ray metric): the pressures and instance counts it saw on its
last tick, the threshold it set, and its decisions by kind."""

from __future__ import annotations

from typing import Protocol

from controller.policy import Action, Pressures


class Metrics(Protocol):
    def tick(self, pressures: Pressures, threshold: int) -> None: ...

    def decided(self, action: Action) -> None: ...


class RayMetrics:
    """Only inside a Ray worker (the actor)."""

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
        self._threshold = Gauge(
            "pdserve_controller_threshold",
            description="The disaggregation threshold the controller holds",
            tag_keys=("cluster",),
        )
        self._decisions = Counter(
            "pdserve_controller_decisions",
            description="Decisions by kind: flip, repair, threshold, scale",
            tag_keys=("cluster", "kind"),
        )
        for m in (self._pressure, self._instances, self._threshold, self._decisions):
            m.set_default_tags(tags)

    def tick(self, pressures: Pressures, threshold: int) -> None:
        self._pressure.set(pressures.prefill, tags={"role": "prefill"})
        self._pressure.set(pressures.decode, tags={"role": "decode"})
        self._instances.set(pressures.n_prefill, tags={"role": "prefill"})
        self._instances.set(pressures.n_decode, tags={"role": "decode"})
        self._threshold.set(threshold)

    def decided(self, action: Action) -> None:
        self._decisions.inc(tags={"kind": action.kind.value})
