"""The routing table and the routers' demand against a real redis-server, what the
controller makes of them (`Observer`), one controller tick end to end, and the router's
cluster view honouring the table: a flip for switchable instances only, and the
threshold."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import redis

from controller.controller import Controller
from controller.observe import Observer, Snapshot
from controller.settings import ControllerSettings, PlannerConfig
from registry import AdmissionReport, InstanceInfo, LoadReport, Registry, Role
from router.cluster_view import ClusterView

Clean = Callable[[Registry], None]


def _info(iid: str, role: Role, switchable: bool = True) -> InstanceInfo:
    return InstanceInfo(
        instance_id=iid, pool=role.value, role=role, address=f"a-{iid}", switchable=switchable
    )


def _load(queued: int, running: int) -> LoadReport:
    return LoadReport(
        queued_prefill_tokens=queued, running_seqs=running, free_kv_blocks=8, total_kv_blocks=8
    )


def test_the_table_holds_flips_and_the_threshold(
    registry: Registry, redis_client: redis.Redis, assert_clean: Clean
) -> None:
    table = registry.routing
    assert table.read().roles == {} and table.read().threshold is None
    table.set_role("d0", Role.PREFILL)
    table.set_role("p0", Role.DECODE)
    table.set_threshold(128)
    state = table.read()
    assert state.roles == {"d0": Role.PREFILL, "p0": Role.DECODE} and state.threshold == 128
    assert table.prune_roles(["d0"]) == ["p0"]
    table.clear_role("d0")
    assert table.read().roles == {}
    table.log_decision({"kind": "flip", "instance": "d0"})
    table.log_decision({"kind": "threshold", "threshold_to": 128})
    assert [d["kind"] for d in table.decisions()] == ["flip", "threshold"]
    table.clear()
    redis_client.delete(registry.keys.decisions)
    assert_clean(registry)


def test_the_observer_turns_cumulative_counts_into_the_interval_demand(
    registry: Registry,
) -> None:
    registry.register(_info("p0", Role.PREFILL))
    registry.register(_info("d0", Role.DECODE))
    registry.register(_info("d1", Role.DECODE, switchable=False))
    registry.report_load("p0", _load(300, 0))
    registry.report_load("d0", _load(0, 3))
    registry.routing.set_role("d0", Role.PREFILL)
    registry.routing.set_role("d1", Role.PREFILL)  # not switchable: stays decode
    started = time.time()

    def report(arrived: int, refused: int, finished: int, rq: float, rn: int) -> None:
        registry.routing.report_admission(
            AdmissionReport(
                router_id="r1", started=started, ts=time.time(), arrived=arrived,
                refused=refused, finished=finished, queue_s=rq * 2, remote_queue_s=rq,
                remote_count=rn, tpot_s=0.5, tpot_count=finished,
            )
        )  # fmt: skip

    observer = Observer()
    report(10, 1, 8, 2.0, 4)
    first = observer.observe(Snapshot.read(registry, 100.0))
    assert first.demand.arrived == 0  # no interval yet
    roles = {i.instance_id: (i.home, i.role, i.queued_prefill_tokens) for i in first.instances}
    assert roles == {
        "p0": (Role.PREFILL, Role.PREFILL, 300),
        "d0": (Role.DECODE, Role.PREFILL, 0),
        "d1": (Role.DECODE, Role.DECODE, 0),
    }
    report(30, 3, 18, 5.0, 10)
    snap = Snapshot.read(registry, 102.0)
    demand = observer.observe(snap).demand
    assert (demand.interval_s, demand.arrived, demand.refused, demand.finished) == (2.0, 20, 2, 10)
    assert demand.mean_remote_queue_s == 0.5  # (5 - 2) s over 6 remote prefills
    assert demand.arrival_rate == 10.0
    # The snapshot's JSON form replays to the same observation.
    again = Observer()
    again.observe(Snapshot.from_json(Snapshot.read(registry, 100.0).to_json()))
    assert Snapshot.from_json(snap.to_json()) == snap
    registry.routing.drop_admission("r1")
    assert registry.routing.admissions() == {}
    for iid in ("p0", "d0", "d1"):
        registry.deregister(iid)
    registry.routing.clear()


def test_one_tick_flips_in_the_table_and_logs_it(registry: Registry) -> None:
    planner = PlannerConfig(sustain_ticks=1, prefill_full_tokens=100, min_flip_interval_s=0)
    settings = ControllerSettings(
        cluster=registry.cluster, app_name="app", redis_url="unused", lease_ttl_s=10.0,
        prefill_pool="prefill", decode_pool="decode",
        replicas={"prefill": 1, "decode": 2}, initial_threshold=64, planner=planner,
    )  # fmt: skip
    ctl = Controller(settings, registry)
    ctl.start()
    assert registry.routing.read().threshold == 64
    registry.register(_info("p0", Role.PREFILL))
    registry.register(_info("d0", Role.DECODE))
    registry.register(_info("d1", Role.DECODE))
    registry.report_load("p0", _load(1000, 0))
    registry.report_load("d0", _load(0, 0))
    registry.report_load("d1", _load(0, 2))
    registry.routing.set_role("gone", Role.PREFILL)  # an instance that left
    (flip,) = ctl.tick(1.0, slow=False)
    assert (flip.instance_id, flip.to_role) == ("d0", Role.PREFILL)  # the idler one
    assert registry.routing.read().roles == {"d0": Role.PREFILL}
    (logged,) = registry.routing.decisions()
    assert logged == flip.record() and logged["prefill_pressure"] == 10.0
    ctl.stop()
    assert registry.routing.read().roles == {}
    for iid in ("p0", "d0", "d1"):
        registry.deregister(iid)


def test_the_cluster_view_honours_the_table(registry: Registry) -> None:
    registry.register(_info("p0", Role.PREFILL))
    registry.register(_info("d0", Role.DECODE))
    registry.register(_info("d1", Role.DECODE))
    registry.register(_info("d2", Role.DECODE, switchable=False))
    registry.routing.set_role("d0", Role.PREFILL)
    registry.routing.set_role("d2", Role.PREFILL)
    registry.routing.set_threshold(200)

    async def run() -> None:
        view = ClusterView(registry, refresh_interval_s=0.05)
        await view.start()
        try:
            pre = {c.instance_id: c.pool for c in view.candidates(Role.PREFILL)}
            dec = {c.instance_id for c in view.candidates(Role.DECODE)}
            assert pre == {"p0": "prefill", "d0": "decode"}  # d0 reached through its pool
            assert dec == {"d1", "d2"}
            assert view.threshold == 200
            registry.routing.clear()
            await asyncio.sleep(0.3)
            assert {c.instance_id for c in view.candidates(Role.PREFILL)} == {"p0"}
            assert view.threshold is None
        finally:
            await view.stop()

    asyncio.run(run())
    for iid in ("p0", "d0", "d1", "d2"):
        registry.deregister(iid)
