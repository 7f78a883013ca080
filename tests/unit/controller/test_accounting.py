"""Every decision is accounted for, against a real redis-server: logged as one INFO
line of JSON with its inputs, appended to the decision stream, and counted in the
metrics; one that Serve refuses to apply is logged and counted as failed instead; each
tick exports the pressures, the demand, the threshold and the replica counts (a
count Serve refused stays the one in force). A
controller that takes over starts from the replica counts Serve holds, not the
config's. The scaler here keeps its targets in memory, as Serve's controller would."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping

import pytest

from controller.controller import Controller
from controller.policy import Action, ActionKind, Demand, Pressures
from controller.settings import ControllerSettings, PlannerConfig
from registry import InstanceInfo, LoadReport, Registry, Role


class MemoryScaler:
    def __init__(self, targets: dict[str, int], broken: bool = False) -> None:
        self.held = dict(targets)
        self.broken = broken

    def scale(self, pool: str, replicas: int) -> None:
        if self.broken:
            raise OSError("the Serve controller is unreachable")
        self.held[pool] = replicas

    def targets(self) -> dict[str, int]:
        return dict(self.held)


class Recorded:
    def __init__(self) -> None:
        self.ticks: list[tuple[Pressures, Demand, int, dict[str, int]]] = []
        self.decided_kinds: list[ActionKind] = []
        self.failed_kinds: list[ActionKind] = []
        self.lease: list[bool] = []

    def tick(
        self, pressures: Pressures, demand: Demand, threshold: int, replicas: Mapping[str, int]
    ) -> None:
        self.ticks.append((pressures, demand, threshold, dict(replicas)))

    def decided(self, action: Action) -> None:
        self.decided_kinds.append(action.kind)

    def failed(self, action: Action) -> None:
        self.failed_kinds.append(action.kind)

    def leading(self, held: bool) -> None:
        self.lease.append(held)


def _controller(registry: Registry, scaler: MemoryScaler, metrics: Recorded) -> Controller:
    planner = PlannerConfig(
        scaling=True, scale_cooldown_s=0, flip_at=1000, prefill_full_tokens=100,
        threshold_min=64, threshold_max=64,
    )  # fmt: skip
    settings = ControllerSettings(
        cluster=registry.cluster, app_name="app", redis_url="unused", lease_ttl_s=10.0,
        prefill_pool="prefill", decode_pool="decode",
        replicas={"prefill": 1, "decode": 1}, initial_threshold=64, planner=planner,
    )  # fmt: skip
    return Controller(settings, registry, scaler, metrics)


def _busy_prefill(registry: Registry) -> None:
    for iid, role in (("p0", Role.PREFILL), ("d0", Role.DECODE)):
        registry.register(
            InstanceInfo(instance_id=iid, pool=role.value, role=role, address=f"a-{iid}")
        )
    load = LoadReport(
        queued_prefill_tokens=500, running_seqs=0, free_kv_blocks=8, total_kv_blocks=8
    )
    registry.report_load("p0", load)


def test_a_scale_is_applied_logged_with_its_inputs_and_counted(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    scaler, metrics = MemoryScaler({"prefill": 2, "decode": 1, "router": 1}), Recorded()
    ctl = _controller(registry, scaler, metrics)
    ctl.start()
    assert ctl.policy.replicas == {"prefill": 2, "decode": 1}  # Serve's, not the config's
    _busy_prefill(registry)
    with caplog.at_level(logging.INFO, logger="controller.controller"):
        (scale,) = ctl.tick(1.0, slow=True)
    assert (scale.kind, scale.pool, scale.replicas) == (ActionKind.SCALE, "prefill", (2, 3))
    assert scaler.held["prefill"] == 3
    (logged,) = registry.routing.decisions()
    assert logged == scale.record()
    for key in (
        "prefill_pressure",
        "decode_pressure",
        "n_prefill",
        "n_decode",
        "arrived",
        "refused",
        "refused_at_ingress",
        "interval_s",
        "replicas_from",
        "replicas_to",
    ):
        assert key in logged, key  # fmt: skip
    assert logged["prefill_pressure"] == 5.0
    (line,) = [r.getMessage() for r in caplog.records if "controller decision" in r.getMessage()]
    assert json.loads(line.split(" ", 2)[2]) == logged
    assert metrics.decided_kinds == [ActionKind.SCALE] and metrics.failed_kinds == []
    (tick,) = metrics.ticks
    assert tick[0].prefill == 5.0 and tick[2] == 64
    assert tick[3] == {"prefill": 3, "decode": 1}  # exported after the tick's decisions
    ctl.stop()
    for iid in ("p0", "d0"):
        registry.deregister(iid)


def test_a_scale_serve_refuses_is_logged_and_counted_as_failed(
    registry: Registry, caplog: pytest.LogCaptureFixture
) -> None:
    scaler, metrics = MemoryScaler({"prefill": 1, "decode": 1}, broken=True), Recorded()
    ctl = _controller(registry, scaler, metrics)
    ctl.start()
    _busy_prefill(registry)
    with caplog.at_level(logging.WARNING, logger="controller.controller"):
        (scale,) = ctl.tick(1.0, slow=True)
    assert scale.kind is ActionKind.SCALE
    assert metrics.failed_kinds == [ActionKind.SCALE] and metrics.decided_kinds == []
    assert ctl.decisions == [] and registry.routing.decisions() == []
    assert ctl.policy.replicas["prefill"] == 1  # back to what Serve holds
    assert metrics.ticks[-1][3] == {"prefill": 1, "decode": 1}
    (warning,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "not applied" in warning.getMessage() and "prefill_pressure" in warning.getMessage()
    ctl.stop()
    for iid in ("p0", "d0"):
        registry.deregister(iid)
