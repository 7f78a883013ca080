"""The locustfile, headless for a few seconds against a tiny-model cluster on local Ray.

Locust runs in its own process: its gevent monkey-patching must not reach this
process, which drives Ray. The cluster requires a gRPC bearer token and an HTTP API
key, so the run also shows that the locustfile passes both. The check reads locust's
CSV and HTML output: every request type (gRPC and HTTP; TTFT, TPOT and E2E) was
reported, and nothing failed. The harness's teardown then checks that no blocks,
streams or transfers leaked on either pool.
"""

from __future__ import annotations

import csv
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import ClusterHarness, tiny_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
LOCUSTFILE = ROOT / "tests" / "load" / "locustfile.py"
TOKEN = "load-test-token"
API_KEY = "load-test-key"
RUN_S = 6
METRICS = ("TTFT", "TPOT", "E2E")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "loadtest",
        [
            "pools.prefill.engine.kv_cache_bytes=4MiB",
            "pools.decode.engine.kv_cache_bytes=4MiB",
            "router.disaggregation_threshold=32",  # the short mix takes both paths
            f"server.grpc_bearer_token={TOKEN}",
            f"server.api_key={API_KEY}",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


def test_locust_headless_reports_every_metric(cluster: ClusterHarness, tmp_path: Path) -> None:
    prefix = tmp_path / "load"
    html = tmp_path / "report.html"
    cmd = [
        sys.executable, "-m", "locust", "-f", str(LOCUSTFILE),
        "--headless", "-u", "4", "-r", "4", "-t", f"{RUN_S}s", "--stop-timeout", "30",
        "--host", cluster.http_url, "--grpc-target", cluster.grpc_target,
        "--grpc-token", TOKEN, "--api-key", API_KEY,
        "--mix", "short", "--max-model-len", "256", "--seed", "0",
        "--csv", str(prefix), "--html", str(html), "--only-summary",
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert done.returncode == 0, output

    with open(f"{prefix}_stats.csv", newline="") as fh:
        rows = {(r["Type"], r["Name"]): r for r in csv.DictReader(fh)}
    for kind in ("grpc", "http"):
        for metric in METRICS:
            row = rows.get((kind, metric))
            assert row is not None, f"{kind} {metric} was not reported:\n{output}"
            assert int(row["Request Count"]) > 0, row
            assert int(row["Failure Count"]) == 0, row
            assert float(row["Average Response Time"]) > 0 or metric == "TPOT", row
        # one E2E per request; TTFT and TPOT for each successful one
        n = int(rows[(kind, "E2E")]["Request Count"])
        assert int(rows[(kind, "TTFT")]["Request Count"]) == n
        assert int(rows[(kind, "TPOT")]["Request Count"]) == n
        # 16 tokens asked for per request (the short mix), so E2E's content size is 16
        assert float(rows[(kind, "E2E")]["Average Content Size"]) == 16.0

    report = html.read_text()
    for kind in ("grpc", "http"):
        for metric in METRICS:
            assert f'"method": "{kind}", "name": "{metric}"' in report
