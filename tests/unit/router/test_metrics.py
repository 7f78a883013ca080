"""The router's fallback metric: one label per kind of fallback, from the enum."""

from __future__ import annotations

from router.metrics import RouterMetrics
from worker.messages import FallbackReason


def _sample(metrics: RouterMetrics, name: str, labels: dict[str, str] | None = None) -> float:
    value = metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


def test_each_fallback_kind_is_its_own_label() -> None:
    m = RouterMetrics()
    for reason in FallbackReason:
        m.fallback(reason)
    m.fallback(FallbackReason.DECODE_FULL)
    counts = {
        r.value: _sample(m, "pdserve_remote_prefill_fallbacks_total", {"reason": r.value})
        for r in FallbackReason
    }
    assert counts == {"decode_full": 2, "transfer": 1, "prefill_failed": 1}
    # only a failed transfer is also a transfer failure (the router counts failed prefills)
    assert _sample(m, "pdserve_kv_transfer_failures_total") == 1


def test_failure_series_start_at_zero() -> None:
    """A healthy router shows zero retries, migrations, exclusions and failures, not
    no data (which a dashboard cannot tell from a missing exporter)."""
    m = RouterMetrics()
    zero = {
        ("pdserve_request_retries_total", ("reason", "unavailable")),
        ("pdserve_stream_migrations_total", ("reason", "unavailable")),
        ("pdserve_stream_migrations_total", ("reason", "internal")),
        ("pdserve_instance_exclusions_total", ("kind", "call")),
        ("pdserve_instance_exclusions_total", ("kind", "serve")),
        ("pdserve_instance_exclusions_total", ("kind", "probe")),
        ("pdserve_remote_prefill_fallbacks_total", ("reason", "transfer")),
        ("pdserve_prefill_failures_total", ()),
        ("pdserve_kv_transfer_failures_total", ()),
    }
    for name, label in zero:
        labels = dict([label]) if label else {}
        assert m.registry.get_sample_value(name, labels) == 0.0, (name, labels)
    m.migrations.labels("unavailable").inc()
    assert _sample(m, "pdserve_stream_migrations_total", {"reason": "unavailable"}) == 1
