"""Requests Serve's proxy refuses before the router's code runs, read back as the
controller reads them, on local Ray: an ingress deployment with `max_queued_requests`
holds one slow request at a time, and of a burst of clients most get Serve's 429; the
deployment also refuses some requests itself and counts them as the router does
(`RouterMetrics.failed`). The controller's scraper and tally then count exactly the
proxy's refusals, not the deployment's own.

With PDSERVE_INGRESS_RECORDING set, the two scrapes (cut to the metrics the controller
reads) and the count are written there, to refresh tests/unit/controller/recorded/
ingress-*, which test_refusals.py replays.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import ray
from cluster_harness import free_port, wait_until
from ray import serve
from ray.serve.config import BackpressureConfig, HTTPOptions

from controller.refusals import IngressCounts, IngressTally, MetricsScraper
from router.metrics import RouterMetrics

pytestmark = pytest.mark.slow

APP = "ingress"
RECORD_TO = os.environ.get("PDSERVE_INGRESS_RECORDING")
KEEP = ("serve_num_http_requests", "pdserve_requests")


@serve.deployment(
    max_ongoing_requests=1,
    max_queued_requests=1,
    backpressure_config=BackpressureConfig(status_code=429),
    ray_actor_options={"num_cpus": 0},
)
class Ingress:
    def __init__(self) -> None:
        self._metrics = RouterMetrics({"pool": "router", "replica": "r0", "rank": "0"})

    async def __call__(self, request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        if request.query_params.get("full"):  # refused by "the router" itself
            self._metrics.failed("http", "resource_exhausted")
            return PlainTextResponse("full", status_code=429)
        await asyncio.sleep(1.5)
        return PlainTextResponse("ok")


@pytest.fixture(scope="module")
def http_port() -> Iterator[int]:
    port = free_port()
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        _metrics_export_port=free_port(),
        _system_config={"metrics_report_interval_ms": 500},
    )
    try:
        serve.start(http_options=HTTPOptions(host="127.0.0.1", port=port))
        serve.run(Ingress.bind(), name=APP, route_prefix="/")
        yield port
    finally:
        serve.shutdown()
        ray.shutdown()


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=60) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as e:
        return e.code


def _pages(scraper: MetricsScraper) -> list[str]:
    pages = []
    for url in scraper.urls():
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        pages.append("\n".join(ln for ln in text.splitlines() if any(k in ln for k in KEEP)))
    return pages


def test_the_proxys_refusals_are_counted_apart_from_the_routers(http_port: int) -> None:
    scraper = MetricsScraper(APP)
    url = f"http://127.0.0.1:{http_port}/"
    assert _get(url) == 200
    assert _get(url + "?full=1") == 429  # both counters' series now exist
    wait_until(lambda: _counted(scraper, 1, 1), 30.0, "the first counts exported")
    before = _pages(scraper)
    tally = IngressTally()
    assert tally.refused(IngressCounts.parse(before, APP)) == 0

    codes: list[int] = []
    lock = threading.Lock()

    def client(path: str) -> None:
        code = _get(url + path)
        with lock:
            codes.append(code)

    threads = [threading.Thread(target=client, args=("",)) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    at_proxy = codes.count(429)
    assert at_proxy >= 4, codes  # one runs, one queues: most of the 8 are refused
    for _ in range(3):  # one at a time: these reach the deployment, which refuses them
        assert _get(url + "?full=1") == 429
    wait_until(lambda: _counted(scraper, 1 + at_proxy + 3, 1 + 3), 30.0, "the burst exported")
    after = _pages(scraper)
    assert tally.refused(IngressCounts.parse(after, APP)) == at_proxy
    assert tally.refused(IngressCounts.parse(after, APP)) == 0  # nothing new
    if RECORD_TO:
        out = Path(RECORD_TO)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ingress-before.prom").write_text("\n".join(before) + "\n")
        (out / "ingress-after.prom").write_text("\n".join(after) + "\n")
        (out / "ingress.json").write_text(json.dumps({"app": APP, "at_proxy": at_proxy}) + "\n")


def _counted(scraper: MetricsScraper, proxy: int, router: int) -> bool:
    counts = scraper.read()
    return (
        counts is not None
        and sum(counts.proxy.values()) >= proxy
        and sum(counts.router.values()) >= router
    )
