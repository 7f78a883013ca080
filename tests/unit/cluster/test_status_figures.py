"""`pdserve status`: the figures from two scrapes, and the watch loop's ending."""

from __future__ import annotations

import pytest

from cluster.figures import Figures
from cluster.scrape import Samples, quantile
from cluster.status_cli import watch

ID = 'pool="decode",replica="r1",rank="0"'
R = 'pool="router",replica="a",rank="0",path="colocated"'


def _scrape(requests: int, ttft_fast: int, nbytes: float) -> Samples:
    slow = requests - ttft_fast
    return Samples.parse(
        f"""# TYPE ray_pdserve_up gauge
ray_pdserve_up{{pool="router",replica="a",rank="0",role="router"}} 1
ray_pdserve_up{{{ID},role="decode"}} 1
# TYPE ray_pdserve_ttft_seconds histogram
ray_pdserve_ttft_seconds_bucket{{{R},le="0.1"}} {ttft_fast}
ray_pdserve_ttft_seconds_bucket{{{R},le="1.0"}} {ttft_fast + slow}
ray_pdserve_ttft_seconds_bucket{{{R},le="+Inf"}} {requests}
ray_pdserve_ttft_seconds_count{{{R}}} {requests}
ray_pdserve_ttft_seconds_sum{{{R}}} 1
# TYPE ray_pdserve_engine_kv_free_blocks gauge
ray_pdserve_engine_kv_free_blocks{{{ID}}} 30
# TYPE ray_pdserve_engine_kv_used_blocks gauge
ray_pdserve_engine_kv_used_blocks{{{ID}}} 10
# TYPE ray_pdserve_engine_running_sequences gauge
ray_pdserve_engine_running_sequences{{{ID}}} 3
# TYPE ray_pdserve_kv_transfer_bytes_total counter
ray_pdserve_kv_transfer_bytes_total{{{ID},role="recv"}} {nbytes}
# TYPE ray_pdserve_kv_transfers_completed_total counter
ray_pdserve_kv_transfers_completed_total{{{ID},role="recv"}} {requests}
# TYPE other_metric gauge
other_metric 5
"""
    )


def test_figures_over_a_window_are_rates_and_window_percentiles() -> None:
    before, after = _scrape(10, 10, 1e9), _scrape(30, 10, 5e9)
    assert "other_metric" not in after.names()
    lines = Figures(after, before, 2.0).lines()
    text = "\n".join(lines)
    assert lines[0] == "metrics (last 2.0 s): 1 router replicas, 1 pool processes"
    assert "10.0/s requests" in text  # 20 more requests in 2 s
    # the 20 requests of the window all took between 0.1 and 1 s: p50 is inside that
    assert "ttft p50 550.0 ms" in text
    assert "  decode r1 rank 0: 3 running" in text and "KV 10/40 blocks (25%)" in text
    assert "kv transfer received: 20 done, 0 failed, 2.000 GB/s" in text
    since_start = "\n".join(Figures(after, None, None).lines())
    assert "30 requests" in since_start and "5000.0 MB" in since_start


def test_quantile_interpolates_like_prometheus() -> None:
    assert quantile(0.5, {0.1: 0.0, 1.0: 10.0, float("inf"): 10.0}) == pytest.approx(0.55)
    assert quantile(0.5, {0.1: 0.0, float("inf"): 0.0}) is None
    assert quantile(0.99, {0.1: 0.0, 1.0: 5.0, float("inf"): 10.0}) == 1.0


def test_watch_stops_after_count_or_on_ctrl_c() -> None:
    calls: list[int] = []

    def refresh() -> tuple[list[str], bool]:
        calls.append(1)
        return ["ok"], True

    assert watch(refresh, 0.5, 3, clear=False, sleep=lambda s: None) == 0
    assert len(calls) == 3

    def interrupted(seconds: float) -> None:
        raise KeyboardInterrupt

    calls.clear()
    assert watch(refresh, 0.5, None, clear=False, sleep=interrupted) == 0
    assert len(calls) == 1
    assert watch(lambda: (["down"], False), 0.5, 1, clear=False) == 1
