"""Every process's metrics in one scrape: two router replicas, one prefill and two decode
replicas on local Ray; one scrape of the node's Ray metrics export shows all five,
labelled by pool and replica, with the figures of the requests they served."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import LONG_PROMPTS, ClusterHarness, free_port, tiny_config, wait_until

from cluster.client import AsyncClient, Completion, Sampling
from cluster.figures import Figures
from cluster.launcher import metrics_urls
from cluster.scrape import Samples, scrape

pytestmark = pytest.mark.slow

THRESHOLD = 16
SHORT = ["Hi there", "2 + 2 =", "Hello", "Once"]
GREEDY = Sampling(temperature=0, max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "metrics",
        [
            "router.replicas=2",
            "pools.prefill.replicas=1",
            "pools.decode.replicas=2",
            "pools.prefill.engine.kv_cache_bytes=4MiB",
            "pools.decode.engine.kv_cache_bytes=4MiB",
            f"router.disaggregation_threshold={THRESHOLD}",
            f"ray.metrics_export_port={free_port()}",
            "ray.metrics_report_interval_s=0.5",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


def _run(cluster: ClusterHarness, prompts: list[str]) -> list[Completion]:
    async def run() -> list[Completion]:
        async with AsyncClient(cluster.grpc_target, token=cluster.token) as c:
            return list(await asyncio.gather(*(c.generate(p, GREEDY) for p in prompts)))

    return asyncio.run(run())


def _replicas(s: Samples, role: str) -> set[tuple[str, str]]:
    return {(x.labels["pool"], x.labels["replica"]) for x in s.get("pdserve_up", role=role)}


def test_one_scrape_sees_every_replica(cluster: ClusterHarness) -> None:
    prompts = LONG_PROMPTS[:4] + SHORT
    done = _run(cluster, prompts)
    disagg = sum(d.timings.disaggregated for d in done)
    assert disagg == 4, [d.timings for d in done]
    # The transfer's share of TTFT, measured on the prefill instance's clock.
    assert all(d.timings.kv_transfer_ms > 0 for d in done if d.timings.disaggregated)
    urls = metrics_urls()
    assert len(urls) == 1  # one node, one export
    pools = {(pool, address) for pool, _, address in cluster.instances()}
    n = len(prompts)

    def figures(s: Samples) -> dict[str, float]:
        return {
            "routers": len(_replicas(s, "router")),
            "ttft": s.sum("pdserve_ttft_seconds_count"),
            "recv": s.sum("pdserve_kv_transfers_completed_total", role="recv"),
            "send": s.sum("pdserve_kv_transfers_completed_total", role="send"),
            "engines": len(s.get("pdserve_engine_kv_free_blocks")),
        }

    want = {"routers": 2, "ttft": n, "recv": disagg, "send": disagg, "engines": 3}
    samples: list[Samples] = []

    def scraped() -> bool:
        # Processes report every metrics_report_interval_s: wait until the last counts
        # of every process are in, then check them all on that one scrape.
        samples[:] = [scrape(urls)]
        return figures(samples[0]) == want

    try:
        wait_until(scraped, 60, "the metrics of every process in one scrape", step_s=0.5)
    except AssertionError as e:
        got = figures(samples[0]) if samples else {}
        names = sorted(samples[0].names()) if samples else []
        raise AssertionError(f"{e}: want {want}, got {got}; names {names}") from None
    s = samples[0]

    # All five replicas, each under its own pool and replica labels.
    routers = _replicas(s, "router")
    assert {p for p, _ in routers} == {"router"} and len(routers) == 2
    assert _replicas(s, "prefill") | _replicas(s, "decode") == pools
    # Counters of rare events are exported at zero by every router before any event.
    migrations = s.get("pdserve_stream_migrations_total", reason="unavailable")
    assert {("router", x.labels["replica"]) for x in migrations} == routers
    assert sum(x.value for x in migrations) == 0
    assert len(_replicas(s, "decode")) == 2 and len(_replicas(s, "prefill")) == 1
    steps = s.get("pdserve_engine_step_seconds_count")
    engines = {(x.labels["pool"], x.labels["replica"]) for x in steps}
    assert engines <= pools and len(engines) >= 2  # the prefill and at least one decode

    # The routers' figures add up to the requests sent, across both replicas.
    assert s.sum("pdserve_requests_total", outcome="length") == n
    assert s.sum("pdserve_routing_decisions_total", path="disaggregated") == disagg
    assert s.sum("pdserve_routing_decisions_total", path="colocated", reason="short") == n - disagg
    assert s.sum("pdserve_admissions_total", outcome="accepted") == n
    assert s.sum("pdserve_kv_transfer_seconds_count") == disagg
    assert s.sum("pdserve_e2e_seconds_count") == n
    assert s.sum("pdserve_slo_requests_total") == n

    # Each transfer moved the same bytes and blocks out of the prefill pool and into
    # the decode pool, labelled by role and by the pool that moved them.
    sent = s.sum("pdserve_kv_transfer_bytes_total", role="send", pool="prefill")
    received = s.sum("pdserve_kv_transfer_bytes_total", role="recv", pool="decode")
    assert sent == received > 0
    blocks = s.sum("pdserve_kv_transfer_blocks_total", role="recv")
    assert blocks == s.sum("pdserve_kv_transfer_blocks_total", role="send") >= disagg
    assert s.sum("pdserve_kv_transfer_duration_seconds_count", role="recv") == disagg
    assert s.sum("pdserve_kv_transfer_errors_total") == 0
    assert s.sum("pdserve_kv_recomputed_blocks_total") == 0

    # The engines' figures: gauges from every pool replica, steps from those that ran.
    assert s.sum("pdserve_engine_kv_free_blocks") > 0
    assert s.sum("pdserve_engine_step_tokens_count") > 0

    # `pdserve status` shows them: one line per pool replica, the routers' totals.
    lines = Figures(s, None, None).lines()
    assert "2 router replicas, 3 pool processes" in lines[0], lines
    for pool, replica in pools:
        assert any(line.startswith(f"  {pool} {replica} rank 0: ") for line in lines), lines
    assert any(f"{n} requests" in line for line in lines), lines
    assert any(f"kv transfer received: {disagg} done, 0 failed" in line for line in lines), lines
