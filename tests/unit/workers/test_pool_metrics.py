"""The metrics every process records: definitions, the per-process registry, the
engine's and the transfers' figures."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLMEngine, SamplingParams
from engine.config import EngineConfig
from kv_transfer.base import TransferRecord
from worker.metric_set import Kind, MetricDef, MetricSet
from worker.pool_metrics import ENGINE, EngineMetrics, TransferMetrics, pool_metrics


@pytest.mark.parametrize(
    "bad",
    [
        dict(name="requests", kind=Kind.COUNTER),  # no prefix
        dict(name="pdserve_requests_total", kind=Kind.COUNTER),  # the sinks add _total
        dict(name="pdserve_x_seconds", kind=Kind.HISTOGRAM),  # no buckets
        dict(name="pdserve_x", kind=Kind.GAUGE, buckets=(1.0,)),  # buckets on a gauge
        dict(name="pdserve_x", kind=Kind.GAUGE, labels=("pool",)),  # an identity label
        dict(name="pdserve_x_seconds", kind=Kind.HISTOGRAM, buckets=(2.0, 1.0)),
        dict(name="pdserve_x", kind=Kind.GAUGE, initial=((),)),  # initial: counters only
        dict(name="pdserve_x", kind=Kind.COUNTER, labels=("kind",), initial=((),)),
    ],
)
def test_definitions_follow_the_conventions(bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        MetricDef(help="h", **bad)  # type: ignore[arg-type]


def test_exported_names() -> None:
    c = MetricDef("pdserve_test_events", Kind.COUNTER, "h")
    h = MetricDef("pdserve_test_wait_seconds", Kind.HISTOGRAM, "h", buckets=(1.0,))
    assert c.exported_names("ray_") == ("ray_pdserve_test_events_total",)
    assert h.exported_names() == (
        "pdserve_test_wait_seconds_bucket",
        "pdserve_test_wait_seconds_sum",
        "pdserve_test_wait_seconds_count",
    )
    assert MetricDef("pdserve_test_events", Kind.COUNTER, "h") == c  # the same again: fine
    with pytest.raises(ValueError, match="twice"):
        MetricDef("pdserve_test_events", Kind.GAUGE, "h")


def test_each_set_has_its_own_registry_and_ignores_zero_increments() -> None:
    d = MetricDef("pdserve_test_things", Kind.COUNTER, "h", ("kind",))
    a, b = MetricSet([d], ray_export=False), MetricSet([d], ray_export=False)
    a[d].labels("x").inc(2)
    a[d].labels("x").inc(0)
    assert a.sample("pdserve_test_things_total", {"kind": "x"}) == 2
    assert b.sample("pdserve_test_things_total", {"kind": "x"}) == 0
    with pytest.raises(ValueError, match="labels"):
        a[d].inc()


def test_initial_series_exist_at_zero() -> None:
    d = MetricDef("pdserve_test_rare", Kind.COUNTER, "h", ("kind",), initial=(("a",), ("b",)))
    u = MetricDef("pdserve_test_rare_plain", Kind.COUNTER, "h", initial=((),))
    m = MetricSet([d, u], ray_export=False)
    names = {s.name: s.value for f in m.registry.collect() for s in f.samples}
    assert names["pdserve_test_rare_plain_total"] == 0
    samples = [s for f in m.registry.collect() for s in f.samples if s.name.endswith("rare_total")]
    assert sorted((s.labels["kind"], s.value) for s in samples) == [("a", 0.0), ("b", 0.0)]


def test_transfer_figures() -> None:
    m = pool_metrics("decode", "r1", 1, "decode")
    t = TransferMetrics(m)
    t.record(TransferRecord("recv", True, None, 4096, 4, 0.002))
    t.record(TransferRecord("recv", False, "timed out after 5s", 1024, 1, 0.5))
    t.recomputed(3, "transfer")
    assert m.sample("pdserve_up", {"role": "decode"}) == 1
    assert m.sample("pdserve_kv_transfers_completed_total", {"role": "recv"}) == 1
    assert m.sample("pdserve_kv_transfer_bytes_total", {"role": "recv"}) == 5120
    assert m.sample("pdserve_kv_transfer_blocks_total", {"role": "recv"}) == 5
    errors = {"role": "recv", "reason": "timeout"}
    assert m.sample("pdserve_kv_transfer_errors_total", errors) == 1
    assert m.sample("pdserve_kv_transfer_duration_seconds_count", {"role": "recv"}) == 1
    rate = m.sample("pdserve_kv_transfer_throughput_bytes_per_second_sum", {"role": "recv"})
    assert rate == pytest.approx(4096 / 0.002)
    assert m.sample("pdserve_kv_recomputed_blocks_total", {"reason": "transfer"}) == 3


def test_engine_figures(tiny_model_dir: Path) -> None:
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model_dir), kv_cache_bytes=1 << 20, max_model_len=128, num_threads=1
        )
    )
    m = MetricSet(ENGINE, ray_export=False)
    em = EngineMetrics(m, sample_interval_s=0.0)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("a", list(range(10, 50)), params)
    em.sample(engine)
    assert m.sample("pdserve_engine_waiting_sequences") == 1
    while engine.has_unfinished_requests():
        engine.step()
        em.stepped(0.001, engine.last_step_tokens)
        em.sample(engine)
    assert m.sample("pdserve_engine_step_tokens_sum") == 40 + 2  # the prompt, 2 decodes
    assert m.sample("pdserve_engine_step_seconds_count") == 3
    assert m.sample("pdserve_engine_running_sequences") == 0
    total = engine.block_pool.num_blocks
    assert m.sample("pdserve_engine_kv_free_blocks") == total
    assert m.sample("pdserve_engine_kv_used_blocks") == 0
    engine.add_request("b", list(range(10, 50)), params)  # the same prompt: cached blocks
    while engine.has_unfinished_requests():
        engine.step()
    em.sample(engine)
    assert m.sample("pdserve_engine_prefix_cache_hit_blocks_total") > 0
    assert m.sample("pdserve_engine_prefix_cache_lookup_blocks_total") >= m.sample(
        "pdserve_engine_prefix_cache_hit_blocks_total"
    )
