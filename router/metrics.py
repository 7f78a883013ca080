"""The metrics of one router replica: served at its /metrics, and through Ray's metrics
export with every other process's (worker.metric_set).

These are the request-level figures that only the router sees: outcomes, TTFT, TPOT
and end-to-end latency, the TTFT breakdown, tokens, goodput against the configured
SLO, admission, routing decisions, the remote-prefill fallbacks and KV-transfer
failures reported back by the decode pool, and the failure handling: instances
excluded from routing, requests retried on another instance before their first token,
and streams migrated to another instance mid-way. The pools export their own
(worker.pool_metrics).
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import generate_latest

from router.errors import ErrorKind
from router.policy import RouteDecision
from router.results import Finish
from worker.messages import FallbackReason
from worker.metric_set import Kind, MetricDef, MetricSet
from worker.pool_metrics import UP

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)
# The transfer time TTFT sees is what the per-layer sends did not hide: often well
# under a millisecond.
_KV_BUCKETS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
)
_KV_BUCKETS += (0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def _c(
    name: str, help: str, labels: tuple[str, ...] = (), initial: tuple[tuple[str, ...], ...] = ()
) -> MetricDef:
    return MetricDef(name, Kind.COUNTER, help, labels, initial=initial)


# The label values of the failure counters, whose series start at zero: the kinds of
# error that the router retries (router.retry) and migrates (router.migration).
_RETRIED = ((ErrorKind.UNAVAILABLE.value,),)
_MIGRATED = ((ErrorKind.UNAVAILABLE.value,), (ErrorKind.INTERNAL.value,))


def _h(name: str, help: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()) -> MetricDef:
    return MetricDef(name, Kind.HISTOGRAM, help, labels, buckets)


REQUESTS = _c(
    "pdserve_requests", "Requests by protocol, path and outcome", ("protocol", "path", "outcome")
)
INFLIGHT = MetricDef("pdserve_inflight_requests", Kind.GAUGE, "Requests in flight")
TTFT = _h("pdserve_ttft_seconds", "Time to first token", _LATENCY_BUCKETS, ("path",))
TPOT = _h("pdserve_tpot_seconds", "Mean time per output token", _TPOT_BUCKETS, ("path",))
E2E = _h("pdserve_e2e_seconds", "Arrival to the last token", _LATENCY_BUCKETS, ("path",))
QUEUE = _h("pdserve_queue_seconds", "TTFT spent before prefill", _LATENCY_BUCKETS)
PREFILL = _h("pdserve_prefill_seconds", "Prefill compute", _LATENCY_BUCKETS)
KV_TRANSFER = _h(
    "pdserve_kv_transfer_seconds",
    "TTFT spent on the KV transfer: from the prefill's first token to the KV landing on "
    "the decode instance (what the per-layer sends did not hide)",
    _KV_BUCKETS,
)
PROMPT_TOKENS = _c("pdserve_prompt_tokens", "Prompt tokens")
COMPLETION_TOKENS = _c("pdserve_completion_tokens", "Generated tokens")
GOODPUT = _c(
    "pdserve_slo_requests",
    "Finished requests by whether they met the SLO (TTFT and TPOT within router.slo_*)",
    ("slo",),
)
FALLBACKS = _c(
    "pdserve_remote_prefill_fallbacks",
    "Remote prefills recomputed on the decode instance",
    ("reason",),
    tuple((r.value,) for r in FallbackReason),
)
PREFILL_FAILURES = _c("pdserve_prefill_failures", "Remote prefill calls that failed", (), ((),))
TRANSFER_FAILURES = _c("pdserve_kv_transfer_failures", "KV transfers that failed", (), ((),))
EXCLUSIONS = _c(
    "pdserve_instance_exclusions",
    "Instances taken out of routing after a failure (call: a pool call failed; "
    "serve: Serve dropped the replica; probe: a probe failed)",
    ("kind",),
    (("call",), ("serve",), ("probe",)),
)
RETRIES = _c(
    "pdserve_request_retries",
    "Requests sent to another instance after failing before their first token",
    ("reason",),
    _RETRIED,
)
MIGRATIONS = _c(
    "pdserve_stream_migrations",
    "Streams that broke mid-way and continued on another decode instance",
    ("reason",),
    _MIGRATED,
)
ADMISSIONS = _c(
    "pdserve_admissions",
    "Requests admitted or refused by the in-flight bound",
    ("outcome",),
    (("accepted",), ("refused",)),
)
ROUTES = _c(
    "pdserve_routing_decisions",
    "Routing decisions: the path, and why (disaggregated; short: the uncached prompt is "
    "below the threshold; no_prefill: no prefill pool or instance)",
    ("path", "reason"),
)
DEFINITIONS = (
    REQUESTS, INFLIGHT, TTFT, TPOT, E2E, QUEUE, PREFILL, KV_TRANSFER, PROMPT_TOKENS,
    COMPLETION_TOKENS, GOODPUT, FALLBACKS, PREFILL_FAILURES, TRANSFER_FAILURES, EXCLUSIONS,
    RETRIES, MIGRATIONS, ADMISSIONS, ROUTES, UP,
)  # fmt: skip


class RouterMetrics:
    def __init__(
        self,
        identity: Mapping[str, str] | None = None,
        *,
        slo_ttft_s: float = float("inf"),
        slo_tpot_s: float = float("inf"),
        ray_export: bool | None = None,
    ) -> None:
        self.set = MetricSet(DEFINITIONS, identity, ray_export=ray_export)
        self.registry = self.set.registry
        m = self.set
        self._slo = (slo_ttft_s, slo_tpot_s)
        self.requests, self.inflight = m[REQUESTS], m[INFLIGHT]
        self.ttft, self.tpot, self.e2e = m[TTFT], m[TPOT], m[E2E]
        self.queue, self.prefill, self.kv_transfer = m[QUEUE], m[PREFILL], m[KV_TRANSFER]
        self.prompt_tokens, self.completion_tokens = m[PROMPT_TOKENS], m[COMPLETION_TOKENS]
        self.goodput, self.fallbacks = m[GOODPUT], m[FALLBACKS]
        self.prefill_failures, self.transfer_failures = m[PREFILL_FAILURES], m[TRANSFER_FAILURES]
        self.exclusions, self.retries, self.migrations = m[EXCLUSIONS], m[RETRIES], m[MIGRATIONS]
        self.admissions, self.routes = m[ADMISSIONS], m[ROUTES]
        m[UP].labels("router").set(1)

    def finished(self, protocol: str, finish: Finish, e2e_s: float | None = None) -> None:
        t = finish.timings
        path = "disaggregated" if t.disaggregated else "colocated"
        self.requests.labels(protocol, path, finish.reason).inc()
        self.ttft.labels(path).observe(t.ttft_ms / 1000)
        if finish.usage.completion_tokens > 1:
            self.tpot.labels(path).observe(t.mean_tpot_ms / 1000)
        if e2e_s is not None:
            self.e2e.labels(path).observe(e2e_s)
        self.queue.observe(t.queue_ms / 1000)
        self.prefill.observe(t.prefill_ms / 1000)
        if t.disaggregated:
            self.kv_transfer.observe(t.kv_transfer_ms / 1000)
        self.prompt_tokens.inc(finish.usage.prompt_tokens)
        self.completion_tokens.inc(finish.usage.completion_tokens)
        ttft_slo, tpot_slo = self._slo
        met = t.ttft_ms / 1000 <= ttft_slo and (
            finish.usage.completion_tokens <= 1 or t.mean_tpot_ms / 1000 <= tpot_slo
        )
        self.goodput.labels("met" if met else "missed").inc()

    def failed(self, protocol: str, outcome: str) -> None:
        self.requests.labels(protocol, "none", outcome).inc()

    def admitted(self, ok: bool) -> None:
        self.admissions.labels("accepted" if ok else "refused").inc()

    def routed(self, route: RouteDecision, threshold: int) -> None:
        if route.prefill is not None:
            self.routes.labels("disaggregated", "disaggregated").inc()
        elif route.uncached_tokens < threshold:
            self.routes.labels("colocated", "short").inc()
        else:
            self.routes.labels("colocated", "no_prefill").inc()

    def fallback(self, reason: FallbackReason) -> None:
        self.fallbacks.labels(reason.value).inc()
        if reason is FallbackReason.TRANSFER_FAILED:
            self.transfer_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
