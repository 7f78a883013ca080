"""A colocated-only cluster (one pool that prefills and decodes) on local Ray, over both
front ends: greedy identity with the single-process engine, concurrent streams,
invalid requests, authentication, cancellation, health, reflection and metrics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cluster_harness import MAX_TOKENS, ClusterHarness, greedy, tiny_config, wait_until
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
    ProtoReflectionDescriptorDatabase,
)

from cluster.client import AsyncClient, Client, ClientError, Sampling, build_request
from engine import LLM
from protos.pdserve.v1 import SERVICE_NAME

pytestmark = pytest.mark.slow

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a land far away, there lived a",
    "def fibonacci(n):",
    "1, 2, 3, 4,",
]
GREEDY = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "colo",
        [
            "pools=[{name: main, role: colocated, engine: {kv_cache_bytes: 4MiB}}]",
            "server.grpc_bearer_token=test-token",
            "server.api_key=test-key",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def reference(reference_llm: LLM) -> dict[str, list[int]]:
    outs = reference_llm.generate(PROMPTS, greedy())
    return {p: o.token_ids for p, o in zip(PROMPTS, outs, strict=True)}


def test_grpc_greedy_matches_single_engine(
    cluster: ClusterHarness, reference: dict[str, list[int]], reference_llm: LLM
) -> None:
    with cluster.client() as c:
        for prompt in PROMPTS:
            done = c.generate(prompt, GREEDY)
            assert list(done.token_ids) == reference[prompt]
            assert done.finish_reason == "length"
            assert done.usage.completion_tokens == MAX_TOKENS
            assert not done.timings.disaggregated and done.timings.kv_transfer_ms == 0
            assert done.timings.ttft_ms > 0 and done.timings.mean_tpot_ms > 0
            assert done.request_id.startswith("req-")
        ids = reference_llm.tokenizer.encode(PROMPTS[0])
        by_ids = c.generate(token_ids=ids, sampling=GREEDY)
        assert list(by_ids.token_ids) == reference[PROMPTS[0]]
        assert by_ids.usage.prompt_tokens == len(ids)

        conversation = [{"role": "user", "content": "Name three colors."}]
        want = reference_llm.chat([conversation], greedy())[0]
        chat = c.chat([("user", "Name three colors.")], GREEDY)
        assert list(chat.token_ids) == want.token_ids
        assert chat.text == want.text


def test_concurrent_grpc_and_http_streams(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    """Four gRPC streams (asyncio client) and two HTTP requests (SSE and not) at once;
    every one gets exactly the single engine's tokens."""
    http_results: dict[str, Any] = {}

    def http_calls() -> None:
        body = {
            "prompt": PROMPTS[1],
            "max_tokens": MAX_TOKENS,
            "temperature": 0,
            "ignore_eos": True,
        }
        http_results["plain"] = cluster.http("POST", "/v1/completions", body)
        events = list(
            cluster.sse("/v1/completions", {**body, "prompt": PROMPTS[2], "stream": True})
        )
        http_results["sse"] = events

    async def grpc_calls() -> list[tuple[str, tuple[int, ...]]]:
        async with AsyncClient(cluster.grpc_target, token=cluster.token) as c:

            async def one(prompt: str) -> tuple[str, tuple[int, ...]]:
                tokens: list[int] = []
                async for chunk in c.stream(prompt, GREEDY):
                    tokens.extend(chunk.token_ids)
                return prompt, tuple(tokens)

            return await asyncio.gather(*(one(p) for p in PROMPTS))

    thread = threading.Thread(target=http_calls)
    thread.start()
    results = asyncio.run(grpc_calls())
    thread.join(timeout=120)
    assert not thread.is_alive()
    for prompt, tokens in results:
        assert list(tokens) == reference[prompt], prompt
    plain = http_results["plain"]
    assert plain.status == 200, plain.body
    choice = plain.json()["choices"][0]
    assert choice["token_ids"] == reference[PROMPTS[1]]
    assert choice["finish_reason"] == "length"
    assert plain.json()["usage"]["completion_tokens"] == MAX_TOKENS
    events = http_results["sse"]
    streamed = [t for e in events for t in e["choices"][0]["token_ids"]]
    assert streamed == reference[PROMPTS[2]]
    assert events[-1]["choices"][0]["finish_reason"] == "length"
    assert events[-1]["timings"]["ttft_ms"] > 0


def test_http_chat_streaming_matches_grpc(cluster: ClusterHarness) -> None:
    messages = [{"role": "user", "content": "Say hello."}]
    with cluster.client() as c:
        want = c.chat([("user", "Say hello.")], GREEDY)
    body = {"messages": messages, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    whole = cluster.http("POST", "/v1/chat/completions", body)
    assert whole.status == 200, whole.body
    msg = whole.json()["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": want.text}
    events = list(
        cluster.sse(
            "/v1/chat/completions",
            {**body, "stream": True, "stream_options": {"include_usage": True}},
        )
    )
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    text = "".join(e["choices"][0]["delta"]["content"] for e in events if e["choices"])
    assert text == want.text
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == MAX_TOKENS


GRPC_INVALID = [
    ("token ids too long", {"token_ids": [5] * 300}, "token_ids.ids"),
    ("prompt too long", {"prompt": "word " * 400}, "prompt"),
    ("max_tokens 0", {"prompt": "hi", "sampling": Sampling(max_tokens=0)}, "sampling.max_tokens"),
    (
        "max_tokens 1e9",
        {"prompt": "hi", "sampling": Sampling(max_tokens=10**9)},
        "sampling.max_tokens",
    ),
    ("top_p 2", {"prompt": "hi", "sampling": Sampling(top_p=2.0)}, "sampling.top_p"),
    ("empty messages", {"messages": []}, "chat.messages"),
    ("bad role", {"messages": [("robot", "hi")]}, "chat.messages[0].role"),
    ("no input", {}, "input"),
    ("id outside vocab", {"token_ids": [1, 10**6]}, "token_ids.ids[1]"),
    (
        "too many stops",
        {"prompt": "hi", "sampling": Sampling(stop=tuple("abcdefghijklmnopq"))},
        "sampling.stop",
    ),
    ("logprobs 21", {"prompt": "hi", "sampling": Sampling(logprobs=21)}, "sampling.logprobs"),
    (
        "negative temperature",
        {"prompt": "hi", "sampling": Sampling(temperature=-1)},
        "sampling.temperature",
    ),
]


@pytest.mark.parametrize("case", GRPC_INVALID, ids=[c[0] for c in GRPC_INVALID])
def test_grpc_invalid_request_names_field_and_server_keeps_serving(
    cluster: ClusterHarness, case: tuple[str, dict[str, Any], str]
) -> None:
    _, kwargs, field = case
    with cluster.client() as c:
        with pytest.raises(ClientError) as err:
            list(c.stream_request(build_request(**kwargs)))
        assert err.value.code is grpc.StatusCode.INVALID_ARGUMENT
        assert err.value.details.startswith(field + ":"), err.value.details
        assert c.generate("hello", Sampling(max_tokens=2)).usage.completion_tokens == 2


HTTP_INVALID = [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 10**9}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "top_p": 2}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "top_p": "abc"}, "top_p"),
    ("/v1/completions", {"prompt": "word " * 400}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, "n"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "x", "content": "hi"}]}, "messages[0].role"),
]


@pytest.mark.parametrize("case", HTTP_INVALID, ids=[f"{c[0]}-{c[2]}" for c in HTTP_INVALID])
def test_http_invalid_request_is_400_naming_field(
    cluster: ClusterHarness, case: tuple[str, dict[str, Any], str]
) -> None:
    path, body, field = case
    reply = cluster.http("POST", path, body)
    assert reply.status == 400, reply.body
    error = reply.json()["error"]
    assert error["param"] == field, error
    assert error["message"].startswith(field), error
    ok = cluster.http("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert ok.status == 200 and ok.json()["usage"]["completion_tokens"] == 2


def test_malformed_json_and_oversized_body(cluster: ClusterHarness) -> None:
    import urllib.request

    req = urllib.request.Request(
        cluster.http_url + "/v1/completions",
        b"{not json",
        {"Content-Type": "application/json", "Authorization": "Bearer test-key"},
    )
    try:
        urllib.request.urlopen(req, timeout=30)
        raise AssertionError("expected an error")
    except urllib.error.HTTPError as e:
        assert e.code == 400
    big = cluster.http("POST", "/v1/completions", {"prompt": "x" * (2 << 20)})
    assert big.status == 413


def test_oversized_grpc_message_is_refused_by_the_transport(cluster: ClusterHarness) -> None:
    with cluster.client() as c:
        with pytest.raises(ClientError) as err:
            c.generate("x" * (2 << 20))
        assert err.value.code is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert c.generate("hello", Sampling(max_tokens=2)).usage.completion_tokens == 2


def test_authentication(cluster: ClusterHarness) -> None:
    for token in (None, "wrong"):
        with cluster.client(token=token) as c:
            with pytest.raises(ClientError) as err:
                c.list_models()
            assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
            with pytest.raises(ClientError) as err:
                c.generate("hi")
            assert err.value.code is grpc.StatusCode.UNAUTHENTICATED
            assert c.healthy()  # health checks need no token
    assert cluster.http("GET", "/v1/models", key=None).status == 401
    assert cluster.http("POST", "/v1/completions", {"prompt": "hi"}, key="wrong").status == 401
    assert cluster.http("GET", "/health", key=None).status == 200


def test_models_status_health_and_reflection(cluster: ClusterHarness) -> None:
    with cluster.client() as c:
        models = c.list_models()
        assert [(m.id, m.max_model_len, m.is_default) for m in models] == [
            (Path(cluster.model_dir).name, 256, True)
        ]
        state = c.cluster_status()
    assert state.cluster == "colo" and state.ready
    (pool,) = state.pools
    assert (pool.name, pool.role, pool.replicas) == ("main", "colocated", 1)
    (inst,) = pool.instances
    assert inst.load is not None and inst.load.total_kv_blocks > 0
    http_models = cluster.http("GET", "/v1/models").json()
    assert [m["id"] for m in http_models["data"]] == [models[0].id]

    with grpc.insecure_channel(cluster.grpc_target) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ("", SERVICE_NAME):
            reply = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        with pytest.raises(grpc.RpcError) as err:
            health.Check(health_pb2.HealthCheckRequest(service="nope"), timeout=10)
        assert err.value.code() is grpc.StatusCode.NOT_FOUND
        services = set(ProtoReflectionDescriptorDatabase(channel).get_services())
    assert {SERVICE_NAME, "grpc.health.v1.Health"} <= services


def test_cancelled_stream_frees_blocks(cluster: ClusterHarness) -> None:
    (state,) = cluster.worker_states()
    total = state.total_blocks
    with cluster.client() as c:
        stream = c.stream(
            "Tell me a long story.", Sampling(temperature=0, max_tokens=220, ignore_eos=True)
        )
        got = [next(stream), next(stream)]
        assert all(not chunk.finish_reason for chunk in got)
        (busy,) = cluster.worker_states()
        assert busy.num_requests == 1 and busy.free_blocks < total
        stream.close()  # cancels the call
        wait_until(
            lambda: (
                cluster.worker_states()[0].num_requests == 0
                and cluster.worker_states()[0].free_blocks == total
            ),
            20.0,
            "blocks freed after cancel",
        )
        assert c.generate("still serving", Sampling(max_tokens=3)).usage.completion_tokens == 3


def test_http_client_disconnect_aborts_the_request(cluster: ClusterHarness) -> None:
    import http.client
    import json

    (state,) = cluster.worker_states()
    conn = http.client.HTTPConnection("127.0.0.1", cluster.config.server.http_port, timeout=60)
    body = {"prompt": "Write an essay.", "max_tokens": 220, "ignore_eos": True, "stream": True}
    conn.request(
        "POST",
        "/v1/completions",
        json.dumps(body),
        {"Content-Type": "application/json", "Authorization": "Bearer test-key"},
    )
    resp = conn.getresponse()
    assert resp.status == 200
    assert resp.readline().startswith(b"data: ")  # the stream is running
    assert cluster.worker_states()[0].num_requests == 1
    conn.close()  # the client goes away mid-stream
    wait_until(
        lambda: (
            cluster.worker_states()[0].num_requests == 0
            and cluster.worker_states()[0].free_blocks == state.total_blocks
        ),
        20.0,
        "request aborted after disconnect",
    )


def test_metrics(cluster: ClusterHarness) -> None:
    with cluster.client() as c:
        c.generate("count me", Sampling(max_tokens=2))
        with pytest.raises(ClientError):
            c.generate("count me too", Sampling(top_p=5.0))
    reply = cluster.http("GET", "/metrics")
    assert reply.status == 200
    text = reply.body.decode()
    assert 'pdserve_requests_total{outcome="length",path="colocated",protocol="grpc"}' in text
    assert 'outcome="invalid_argument"' in text
    assert "pdserve_ttft_seconds_count" in text
    assert "pdserve_remote_prefill_fallbacks" in text or "pdserve_kv_transfer_failures" in text
    assert cluster.http("GET", "/metrics", key=None).status == 401


def test_calls_name_the_application_when_serve_runs_another(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    """With a second Serve application on the same proxies (the router-overhead
    benchmark's Serve floor), the client's calls still reach pdserve, and the other
    application is reachable by its name."""
    from benchmarks import serve_floor

    serve_floor.deploy()
    try:
        with cluster.client() as c:
            assert c.healthy()
            done = c.generate(PROMPTS[0], GREEDY)
            assert list(done.token_ids) == reference[PROMPTS[0]]
        with Client(cluster.grpc_target, application=serve_floor.APPLICATION) as floor:
            chunks = list(floor.stream(token_ids=[7, 8, 9], sampling=GREEDY))
            assert [t for ch in chunks for t in ch.token_ids] == [
                (7, 8, 9)[i % 3] for i in range(MAX_TOKENS)
            ]
            assert chunks[-1].finish_reason == "length"
            assert serve_floor.ttft_ms(floor, [1, 2], 1) > 0
    finally:
        serve_floor.remove()
