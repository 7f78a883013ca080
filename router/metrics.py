"""Prometheus metrics of one router replica, served at /metrics.

Each replica keeps its own registry (no global state, so a test or a second replica
in the same process starts from zero). Ray Serve exports its own per-deployment
metrics through Ray's metrics agent; these are the request-level ones that only the
router sees: outcomes, TTFT and TPOT, the TTFT breakdown, tokens, the
remote-prefill fallbacks and KV-transfer failures reported back by the decode pool,
and the failure handling: instances excluded from routing and requests retried on
another instance before their first token.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from router.results import Finish
from worker.messages import FallbackReason

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class RouterMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "pdserve_requests",
            "Requests by protocol, path and outcome",
            ["protocol", "path", "outcome"],
            registry=r,
        )
        self.inflight = Gauge("pdserve_inflight_requests", "Requests in flight", registry=r)
        self.prompt_tokens = Counter("pdserve_prompt_tokens", "Prompt tokens", registry=r)
        self.completion_tokens = Counter(
            "pdserve_completion_tokens", "Generated tokens", registry=r
        )
        self._declare_latencies(r)
        self._declare_failures(r)

    def _declare_latencies(self, r: CollectorRegistry) -> None:
        """TTFT, TPOT and the parts of TTFT."""
        self.ttft = Histogram(
            "pdserve_ttft_seconds",
            "Time to first token",
            ["path"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            "pdserve_tpot_seconds",
            "Mean time per output token",
            ["path"],
            buckets=_TPOT_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "pdserve_queue_seconds",
            "TTFT spent before prefill",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.prefill = Histogram(
            "pdserve_prefill_seconds", "Prefill compute", buckets=_LATENCY_BUCKETS, registry=r
        )
        self.kv_transfer = Histogram(
            "pdserve_kv_transfer_seconds",
            "KV transfer not hidden behind compute",
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )

    def _declare_failures(self, r: CollectorRegistry) -> None:
        """Fallbacks, failed calls and transfers, exclusions and retries."""
        self.fallbacks = Counter(
            "pdserve_remote_prefill_fallbacks",
            "Remote prefills recomputed on the decode instance",
            ["reason"],
            registry=r,
        )
        self.prefill_failures = Counter(
            "pdserve_prefill_failures", "Remote prefill calls that failed", registry=r
        )
        self.transfer_failures = Counter(
            "pdserve_kv_transfer_failures", "KV transfers that failed", registry=r
        )
        self.exclusions = Counter(
            "pdserve_instance_exclusions",
            "Instances taken out of routing after a failure (call: a pool call failed; "
            "serve: Serve dropped the replica; probe: a probe failed)",
            ["kind"],
            registry=r,
        )
        self.retries = Counter(
            "pdserve_request_retries",
            "Requests sent to another instance after failing before their first token",
            ["reason"],
            registry=r,
        )

    def finished(self, protocol: str, finish: Finish) -> None:
        t = finish.timings
        path = "disaggregated" if t.disaggregated else "colocated"
        self.requests.labels(protocol, path, finish.reason).inc()
        self.ttft.labels(path).observe(t.ttft_ms / 1000)
        if finish.usage.completion_tokens > 1:
            self.tpot.labels(path).observe(t.mean_tpot_ms / 1000)
        self.queue.observe(t.queue_ms / 1000)
        self.prefill.observe(t.prefill_ms / 1000)
        if t.disaggregated:
            self.kv_transfer.observe(t.kv_transfer_ms / 1000)
        self.prompt_tokens.inc(finish.usage.prompt_tokens)
        self.completion_tokens.inc(finish.usage.completion_tokens)

    def failed(self, protocol: str, outcome: str) -> None:
        self.requests.labels(protocol, "none", outcome).inc()

    def fallback(self, reason: FallbackReason) -> None:
        self.fallbacks.labels(reason.value).inc()
        if reason is FallbackReason.TRANSFER_FAILED:
            self.transfer_failures.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
