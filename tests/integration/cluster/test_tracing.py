"""Traces and request ids on a disaggregated cluster (tiny random model, one prefill and
one decode replica) on local Ray: one request's spans come from the router, the prefill
and the decode replica into the cluster's trace store, `pdserve trace` draws them, and
each layer's KV send starts while the prefill still computes later layers. The client
gets the request id back over HTTP (`x-request-id`) and gRPC (trailing metadata)."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import ray
from cluster_harness import LONG_PROMPTS, ClusterHarness, tiny_config, wait_until

from cluster.client.sync import call_metadata
from cluster.trace_cli import show
from protos.pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc
from registry.traces import TraceStore
from telemetry.records import SpanRecord

pytestmark = pytest.mark.slow

THRESHOLD = 16


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "traced",
        [
            "pools.prefill.engine.kv_cache_bytes=4MiB",
            "pools.decode.engine.kv_cache_bytes=4MiB",
            f"router.disaggregation_threshold={THRESHOLD}",
            "tracing.max_requests=8",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


def _spans(cluster: ClusterHarness, rid: str, need: set[str]) -> list[SpanRecord]:
    """The request's spans once every name in `need` has come in (exports are batched)."""
    store = TraceStore(cluster._redis_client, cluster.config.name)
    got: list[SpanRecord] = []

    def arrived() -> bool:
        got[:] = store.spans(rid)
        return need <= {s.name for s in got}

    try:
        wait_until(arrived, 30.0, f"spans {sorted(need)} of {rid}")
    except AssertionError as e:
        names = sorted({s.name for s in got})
        raise AssertionError(f"{e}; arrived: {names}") from None
    return got


def _complete(cluster: ClusterHarness, prompt: str, rid: str) -> tuple[int, list[str]]:
    body = f'{{"prompt": "{prompt}", "max_tokens": 4, "temperature": 0}}'.encode()
    headers = {"Content-Type": "application/json", "x-request-id": rid}
    req = urllib.request.Request(cluster.http_url + "/v1/completions", body, headers)
    with urllib.request.urlopen(req, timeout=120) as resp:
        resp.read()
        return resp.status, resp.headers.get_all("x-request-id") or []


def test_a_disaggregated_request_is_one_trace_across_the_processes(
    cluster: ClusterHarness,
) -> None:
    rid = "trace-test-disagg-1"
    status, ids = _complete(cluster, LONG_PROMPTS[0], rid)
    assert status == 200 and ids == [rid]
    need = {
        "request", "validate", "tokenize", "route", "dispatch", "decode.wait",
        "decode.stream", "prefill.call", "prefill", "prefill.queue", "prefill.chunk",
        "prefill.layer", "prefill.wait_sent", "decode", "decode.wait_kv", "decode.join",
        "kv.send",
    }  # fmt: skip
    spans = _spans(cluster, rid, need)
    assert len({s.trace_id for s in spans}) == 1
    services = {s.service.split("-")[0] for s in spans}
    assert {"router", "prefill", "decode"} <= services, services
    ids_ = {s.span_id for s in spans}
    roots = [s for s in spans if s.parent_id not in ids_]
    assert [r.name for r in roots] == ["request"]
    # Each layer's send starts before the prefill's last layer has finished computing.
    layers = [s for s in spans if s.name == "prefill.layer"]
    sends = [s for s in spans if s.name == "kv.send"]
    last_layer = max(layers, key=lambda s: (s.attributes["layer"], s.end_ns))
    first_send = min(sends, key=lambda s: s.start_ns)
    assert int(first_send.attributes["layer"]) < int(last_layer.attributes["layer"])
    assert first_send.start_ns < last_layer.end_ns
    text = show(cluster.redis.url, cluster.config.name, rid)
    assert text.splitlines()[0] == f"request {rid}"
    for name in ("request", "prefill.layer layer=0", "kv.send", "decode.wait_kv"):
        assert name in text, text


def test_a_malformed_request_id_is_replaced_and_returned(cluster: ClusterHarness) -> None:
    status, ids = _complete(cluster, "Hi there", "bad id with spaces")
    assert status == 200
    ours = [i for i in ids if i.startswith("req-")]
    assert len(ours) == 1, ids
    _spans(cluster, ours[0], {"request", "decode"})


def test_grpc_returns_the_request_id_in_trailing_metadata(cluster: ClusterHarness) -> None:
    md = (*call_metadata(None, "pdserve"), ("x-request-id", "grpc-trace-1"))
    with grpc.insecure_channel(cluster.grpc_target) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)
        request = pdserve_pb2.GenerateRequest(prompt="Hi there")
        request.sampling.max_tokens = 3
        call = stub.Generate(request, metadata=md, timeout=120)
        replies = list(call)
        trailing = dict(call.trailing_metadata() or ())
    assert replies and all(r.request_id == "grpc-trace-1" for r in replies)
    assert trailing.get("x-request-id") == "grpc-trace-1"
    _spans(cluster, "grpc-trace-1", {"request", "decode"})


def _log_lines(needle: str) -> dict[str, list[str]]:
    """Lines naming `needle` in the Ray session's logs (Serve's replica logs and the
    workers' output), by file."""
    logs = Path(ray._private.worker._global_node.get_session_dir_path()) / "logs"
    out: dict[str, list[str]] = {}
    for path in logs.rglob("*"):
        if path.is_file() and path.suffix in (".log", ".out", ".err"):
            found = [ln for ln in path.read_text(errors="replace").splitlines() if needle in ln]
            if found:
                out[path.name] = found
    return out


def test_a_bad_request_is_one_log_line_with_its_id_and_no_traceback(
    cluster: ClusterHarness,
) -> None:
    rid = "bad-request-log-1"
    body = b'{"prompt": "a", "top_p": 7}'
    headers = {"Content-Type": "application/json", "x-request-id": rid}
    req = urllib.request.Request(cluster.http_url + "/v1/completions", body, headers)
    with pytest.raises(urllib.error.HTTPError) as err:
        urllib.request.urlopen(req, timeout=60)
    assert err.value.code == 400 and err.value.headers.get_all("x-request-id") == [rid]
    found: dict[str, list[str]] = {}

    def logged() -> bool:
        found.update(_log_lines(rid))
        return any("refused" in ln for lines in found.values() for ln in lines)

    wait_until(logged, 30.0, "the refusal's log line")
    lines = [ln for name in sorted(found) for ln in found[name]]
    # The router's line goes to its worker's stderr, which shows the message only (the
    # unit tests check its level); Serve's proxy logs the 400 at INFO.
    assert len([ln for ln in lines if "refused" in ln]) == 1, found
    assert "top_p" in next(ln for ln in lines if "refused" in ln)
    assert not [ln for ln in lines if "ERROR" in ln or "Traceback" in ln], found
