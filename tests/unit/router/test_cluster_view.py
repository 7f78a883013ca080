"""The router's cluster view against a real redis-server: live instances, load reports
plus what the router sent since, the prefix-block index, and instances leaving; an
instance that failed leaving the candidates at once and returning after a newer
heartbeat and a good probe. Also the admission bound."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import pytest

from cluster.redis_server import RedisServer
from registry import InstanceInfo, LoadReport, PrefixOp, Registry, Role, connect
from router.admission import Admission
from router.breaker import CircuitBreaker
from router.cluster_view import ClusterView
from router.pinning import PinnedReplicaUnavailable


@pytest.fixture(scope="module")
def registry() -> Iterator[Registry]:
    with RedisServer() as server:
        client = connect(server.url)
        yield Registry(client, "view-test", lease_ttl_s=5.0)
        client.close()


def _info(iid: str, role: Role) -> InstanceInfo:
    return InstanceInfo(instance_id=iid, pool=role.value, role=role, address=f"addr-{iid}")


def _load(queued: int, running: int, free: int, ts: float) -> LoadReport:
    return LoadReport(
        queued_prefill_tokens=queued, running_seqs=running, free_kv_blocks=free,
        total_kv_blocks=64, ts=ts,
    )  # fmt: skip


def test_view_combines_reports_sent_requests_and_cached_blocks(registry: Registry) -> None:
    registry.register(_info("d0", Role.DECODE))
    registry.register(_info("p0", Role.PREFILL))
    old = time.time() - 1.0
    registry.report_load("d0", _load(queued=0, running=2, free=50, ts=old))
    registry.report_load("p0", _load(queued=100, running=0, free=64, ts=old))
    registry.publish_blocks("d0", PrefixOp.ADD, [11, 12, 13])
    registry.publish_blocks("d0", PrefixOp.EVICT, [13])

    async def run() -> None:
        view = ClusterView(registry, refresh_interval_s=0.05)
        await view.start()
        try:
            (d,) = view.candidates(Role.DECODE, [11, 12, 13, 14])
            assert (d.instance_id, d.address, d.running_seqs, d.free_blocks) == (
                "d0",
                "addr-d0",
                2,
                50,
            )
            assert d.cached_blocks == 2  # 13 was evicted: the chain stops there
            (p,) = view.candidates(Role.PREFILL)
            assert p.queued_prefill_tokens == 100

            # Sent after the last report: counted on top of it until the request is done.
            view.sent("d0", "r1", 0)
            view.sent("p0", "r1", 40)
            (d,) = view.candidates(Role.DECODE)
            (p,) = view.candidates(Role.PREFILL)
            assert (d.running_seqs, p.queued_prefill_tokens) == (3, 140)
            view.done("d0", "r1")
            view.done("p0", "r1")
            assert view.candidates(Role.DECODE)[0].running_seqs == 2

            # New events arrive through the stream; a deregistered instance is gone.
            registry.publish_blocks("d0", PrefixOp.ADD, [13])
            registry.deregister("p0")
            await asyncio.sleep(0.2)
            assert view.candidates(Role.DECODE, [11, 12, 13])[0].cached_blocks == 3
            assert view.candidates(Role.PREFILL) == [] and not view.has_role(Role.PREFILL)
            assert view.refreshing
        finally:
            await view.stop()
            registry.deregister("d0")

    asyncio.run(run())


def test_a_failed_instance_leaves_at_once_and_returns_after_a_heartbeat_and_a_probe(
    registry: Registry,
) -> None:
    registry.register(_info("d1", Role.DECODE))
    registry.register(_info("d2", Role.DECODE))
    registry.report_load("d1", _load(queued=0, running=0, free=64, ts=time.time()))
    probes: list[str] = []
    healthy = {"addr-d1": False}

    async def prober(info: InstanceInfo) -> None:
        probes.append(info.address)
        if not healthy[info.address]:
            raise PinnedReplicaUnavailable(info.address, "is not running")

    async def run() -> None:
        kinds: list[str] = []
        view = ClusterView(registry, 0.05, CircuitBreaker(on_trip=kinds.append), prober)
        await view.start()
        try:
            assert {c.instance_id for c in view.candidates(Role.DECODE)} == {"d1", "d2"}
            view.failed("addr-d1", ValueError("bad prompt"), "decode")  # not the instance's
            assert len(view.candidates(Role.DECODE)) == 2
            view.failed("addr-d1", PinnedReplicaUnavailable("addr-d1", "died"), "decode")
            assert [c.instance_id for c in view.candidates(Role.DECODE)] == ["d2"]
            assert [c.instance_id for c in view.candidates(Role.DECODE, avoid=frozenset(
                {"addr-d2"}))] == []  # fmt: skip
            await asyncio.sleep(0.3)
            assert probes == []  # its last heartbeat is older than the failure
            registry.report_load("d1", _load(queued=0, running=0, free=64, ts=time.time()))
            await asyncio.sleep(0.3)
            assert probes == ["addr-d1"]  # probed once; the probe failed
            assert [c.instance_id for c in view.candidates(Role.DECODE)] == ["d2"]
            healthy["addr-d1"] = True
            registry.report_load("d1", _load(queued=0, running=0, free=64, ts=time.time()))
            await asyncio.sleep(0.3)
            assert probes == ["addr-d1", "addr-d1"]
            assert {c.instance_id for c in view.candidates(Role.DECODE)} == {"d1", "d2"}
            assert kinds == ["call", "probe"]
            # An instance that leaves the registry leaves the breaker too.
            view.failed("addr-d2", PinnedReplicaUnavailable("addr-d2", "died"), "decode")
            assert [c.instance_id for c in view.candidates(Role.DECODE)] == ["d1"]
            registry.deregister("d2")
            await asyncio.sleep(0.3)
            assert view.breaker.excluded_addresses() == set()
        finally:
            await view.stop()
            registry.deregister("d1")

    asyncio.run(run())


def test_admission_bound() -> None:
    adm = Admission(2)
    assert adm.try_acquire() and adm.try_acquire() and not adm.try_acquire()
    adm.release()
    assert adm.try_acquire()
    adm.release()
    adm.release()
    with pytest.raises(RuntimeError):
        adm.release()
