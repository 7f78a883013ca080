"""Requests refused before the router's code ran: Serve's own backpressure.

The router deployment has `max_queued_requests`: when a proxy's handle already queues
that many requests for the routers, Serve's proxy refuses the next one itself (HTTP
429, gRPC RESOURCE_EXHAUSTED) and the router never sees it, so the routers' admission
counts miss exactly the demand that overflowed. Serve counts every request its
proxies answered, by application and status (`serve_num_http_requests`,
`serve_num_grpc_requests`), and every Ray node's metrics export serves those counters.
The proxies' refusals of the application are the requests answered 429 /
RESOURCE_EXHAUSTED less the ones the routers answered so themselves
(`pdserve_requests{path="none", outcome="resource_exhausted"}`, from the same scrape):

    counts = MetricsScraper(app).read()    one scrape of every live node (None: failed)
    counts = IngressCounts.parse(pages, app)
    tally = IngressTally()
    n = tally.refused(counts)              refusals since the previous counts

Counters are cumulative per series (one per proxy or router process); a series that
went down restarted from zero. The routers' and the proxies' processes export on their
own schedules (every `ray.metrics_report_interval_s`), so one scrape may see a router's
refusal before the proxy's answer to it, or after. `IngressTally` keeps the running
difference and reports only what exceeds the most it has reported: a router's refusal
exported first is never counted, and a proxy's answer exported first counts as the
proxy's until the router's export catches up, after which as many later proxy
refusals go uncounted. Over any span longer than the export lag the total is exact.
gRPC health watches are left out (the router refuses surplus watches itself without
counting them as requests).
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from prometheus_client.parser import text_string_to_metric_families

logger = logging.getLogger(__name__)

_PROXY_REFUSED = {"serve_num_http_requests": "429", "serve_num_grpc_requests": "RESOURCE_EXHAUSTED"}
_ROUTER = "pdserve_requests"
_NAMES = (*_PROXY_REFUSED, _ROUTER)
_SCRAPE_TIMEOUT_S = 2.0


def _metric(name: str) -> str:
    return name.removeprefix("ray_").removesuffix("_total")


def _series(name: str, labels: Mapping[str, str]) -> str:
    return name + "{" + ",".join(f"{k}={labels[k]}" for k in sorted(labels)) + "}"


@dataclass(frozen=True)
class IngressCounts:
    """Cumulative counts by series: the proxies' 429 / RESOURCE_EXHAUSTED answers for
    the application, and the routers' own refusals with those codes."""

    proxy: dict[str, float] = field(default_factory=dict)
    router: dict[str, float] = field(default_factory=dict)

    @staticmethod
    def parse(pages: Iterable[str], app: str) -> IngressCounts:
        proxy: dict[str, float] = {}
        router: dict[str, float] = {}
        for page in pages:
            # A node's page holds every Ray metric; parse only the lines of these.
            kept = "\n".join(ln for ln in page.splitlines() if any(k in ln for k in _NAMES))
            for family in text_string_to_metric_families(kept):
                for s in family.samples:
                    name = _metric(s.name)
                    if s.name.endswith("_created"):
                        continue
                    code = _PROXY_REFUSED.get(name)
                    if code is not None:
                        if (
                            s.labels.get("application") == app
                            and s.labels.get("status_code") == code
                            and "grpc.health" not in s.labels.get("route", "")
                        ):
                            proxy[_series(name, s.labels)] = s.value
                    elif (
                        name == _ROUTER
                        and s.labels.get("path") == "none"
                        and s.labels.get("outcome") == "resource_exhausted"
                    ):
                        router[_series(name, s.labels)] = s.value
        return IngressCounts(proxy, router)

    def to_json(self) -> dict[str, dict[str, float]]:
        return {"proxy": dict(self.proxy), "router": dict(self.router)}

    @staticmethod
    def from_json(raw: Mapping[str, Mapping[str, float]]) -> IngressCounts:
        return IngressCounts(
            {k: float(v) for k, v in raw.get("proxy", {}).items()},
            {k: float(v) for k, v in raw.get("router", {}).items()},
        )


def _increase(before: Mapping[str, float], now: Mapping[str, float]) -> float:
    total = 0.0
    for key, value in now.items():
        old = before.get(key)
        total += value if old is None or value < old else value - old
    return total


class IngressTally:
    def __init__(self) -> None:
        self._previous: IngressCounts | None = None
        self._balance = 0.0  # proxy refusals less the routers' own, since the first counts
        self._reported = 0.0

    def refused(self, counts: IngressCounts | None) -> int:
        """Refusals by the proxies alone since the previous counts (0 for the first
        counts, and when a scrape failed)."""
        if counts is None:
            return 0
        if self._previous is not None:
            self._balance += _increase(self._previous.proxy, counts.proxy)
            self._balance -= _increase(self._previous.router, counts.router)
        self._previous = counts
        new = max(0, int(self._balance - self._reported))
        self._reported += new
        return new


class MetricsScraper:
    """Scrapes the metrics export of every live node of the connected Ray cluster (in
    the controller's process, which is a Ray worker)."""

    def __init__(self, app: str) -> None:
        self._app = app

    def urls(self) -> list[str]:
        import ray

        out = []
        for node in ray.nodes():  # type: ignore[no-untyped-call]
            port = node.get("MetricsExportPort")
            if node.get("Alive") and port:
                host = str(node.get("NodeManagerAddress") or "127.0.0.1")
                out.append(f"http://{host}:{port}/metrics")
        return sorted(out)

    def read(self) -> IngressCounts | None:
        pages = []
        try:
            for url in self.urls():
                with urllib.request.urlopen(url, timeout=_SCRAPE_TIMEOUT_S) as resp:
                    pages.append(resp.read().decode("utf-8", "replace"))
        except (OSError, ValueError) as e:
            logger.warning("scraping Serve's ingress counts failed: %s", e)
            return None
        return IngressCounts.parse(pages, self._app)
