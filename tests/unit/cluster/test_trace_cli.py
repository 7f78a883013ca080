"""`pdserve trace` against a real Redis holding a stored request: the waterfall, the
JSON spans, the list of recent requests, and a clear miss."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator

import pytest
import redis

from cluster.cli import main
from cluster.trace_cli import REDIS_URL_ENV
from registry.traces import REQUEST_ID_ATTR, TraceStore
from telemetry.records import SpanRecord

T = "cd" * 16


@pytest.fixture
def stored(
    redis_server: object, redis_client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> Iterator[str]:
    cluster = f"t-cli-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv(REDIS_URL_ENV, redis_server.url)  # type: ignore[attr-defined]
    store = TraceStore(redis_client, cluster)
    ms = 1_000_000
    layer = SpanRecord(T, "2" * 16, "1" * 16, "prefill.layer", "prefill-a", 2 * ms, 5 * ms)
    root = SpanRecord(T, "1" * 16, "", "request", "router", 0, 10 * ms)
    root.attributes[REQUEST_ID_ATTR] = "req-cli"
    layer.attributes["layer"] = 0
    store.add([layer, root])
    yield cluster
    store.clear()


def test_trace_prints_the_request_s_waterfall(
    stored: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["trace", "req-cli", "--name", stored, "--width", "10"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "request req-cli" and lines[1] == f"trace {T}: 2 spans, 10.0 ms"
    assert lines[3].endswith("|##########|") and "request" in lines[3]
    assert "  prefill.layer layer=0" in lines[4] and lines[4].endswith("|  ###     |")


def test_trace_json_recent_and_a_miss(stored: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["trace", "req-cli", "--name", stored, "--json"]) == 0
    spans = json.loads(capsys.readouterr().out)
    assert sorted(s["name"] for s in spans) == ["prefill.layer", "request"]
    assert main(["trace", "--name", stored]) == 0
    assert capsys.readouterr().out.strip() == f"req-cli  trace {T}"
    assert main(["trace", "req-nope", "--name", stored]) == 1
    assert "no spans stored for 'req-nope'" in capsys.readouterr().out
