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
