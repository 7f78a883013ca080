"""Streams that move mid-way, on a local cluster of one prefill and two decode
replicas (tiny model): a decode replica SIGKILLed under streamed load, and a decode
replica that Serve stops for a scale-down while it streams. Every stream must end with
`[DONE]` (or its last gRPC message) and exactly the text of an undisturbed run (greedy,
or seeded sampling, whose random stream continues where it was),
some of them by moving to the other decode instance (counted in
`pdserve_stream_migrations_total`); then every instance is back to baseline.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
from cluster_harness import (
    LONG_PROMPTS,
    ClusterHarness,
    greedy,
    replica_pid,
    tiny_config,
    wait_until,
)

from benchmarks.fault_load import MAX_MODEL_LEN, GrpcStream, SseStream, StreamResult
from cluster.client import Sampling
from engine import LLM

pytestmark = pytest.mark.slow

THRESHOLD = 16  # the long prompts, and every stream once it has tokens, re-prefill remotely
MAX_TOKENS = 600  # long enough that every stream is still running at the fault
READ_TIMEOUT_S = 30.0
GRACE_S = 2.0  # the decode pool's graceful_shutdown_timeout_s: streams move after 1 s
SHORT = ["Hi there", "2 + 2 =", "The sky is"]
PROMPTS = [*SHORT, *LONG_PROMPTS[:3]]  # greedy
SEEDED = ["Once upon a", LONG_PROMPTS[3]]  # seeded sampling: the random stream goes on
SEED = {"temperature": 0.8, "seed": 1234}
Reference = dict[str, tuple[list[int], str]]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "migrate",
        [
            f"model.max_model_len={MAX_MODEL_LEN}",
            "pools.decode.replicas=2",
            "pools.prefill.engine.kv_cache_bytes=8MiB",
            "pools.decode.engine.kv_cache_bytes=16MiB",
            f"pools.decode.graceful_shutdown_timeout_s={GRACE_S}",
            f"router.disaggregation_threshold={THRESHOLD}",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir), scalable=True).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def reference(reference_llm: LLM) -> dict[str, tuple[list[int], str]]:
    """The undisturbed run's tokens and text per prompt."""
    outs = reference_llm.generate(PROMPTS, greedy(MAX_TOKENS))
    seeded = reference_llm.generate(SEEDED, replace(greedy(MAX_TOKENS), **SEED))
    pairs = zip(PROMPTS + SEEDED, outs + seeded, strict=True)
    return {p: (o.token_ids, o.text) for p, o in pairs}


def _streams(cluster: ClusterHarness) -> dict[str, SseStream | GrpcStream]:
    """Greedy streams, four over HTTP and two over gRPC, and two seeded ones over HTTP."""
    port = cluster.config.server.http_port
    body = {"max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    out: dict[str, SseStream | GrpcStream] = {
        p: SseStream(port, {**body, "prompt": p}, READ_TIMEOUT_S).start() for p in PROMPTS[:4]
    }
    for p in SEEDED:
        out[p] = SseStream(port, {**body, **SEED, "prompt": p}, READ_TIMEOUT_S).start()
    sampling = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    for p in PROMPTS[4:]:
        out[p] = GrpcStream(cluster.grpc_target, p, sampling, 4 * READ_TIMEOUT_S).start()
    wait_until(
        lambda: all(len(s.result.tokens) >= 8 or s.result.ended for s in out.values()),
        60.0,
        "eight tokens on every stream",
    )
    return out


def _join(streams: dict[str, SseStream | GrpcStream]) -> dict[str, StreamResult]:
    deadline = time.monotonic() + 2 * READ_TIMEOUT_S + MAX_TOKENS * 0.2
    return {p: s.join(max(1.0, deadline - time.monotonic())) for p, s in streams.items()}


def _migrations(cluster: ClusterHarness) -> float:
    reply = cluster.http("GET", "/metrics", timeout_s=10)
    assert reply.status == 200
    lines = reply.body.decode().splitlines()
    name = "pdserve_stream_migrations_total"
    return sum(float(line.rsplit(" ", 1)[1]) for line in lines if line.startswith(name))


def _decodes(cluster: ClusterHarness) -> list[tuple[str, str]]:
    return sorted((i, a) for pool, i, a in cluster.instances() if pool == "decode")


def _check(what: str, results: dict[str, StreamResult], reference: Reference) -> tuple[int, int]:
    """Every stream ended properly with the undisturbed run's tokens and text; how many
    did, and how many final messages counted a move."""
    identical = sum(1 for p, r in results.items() if (r.tokens, r.text) == reference[p])
    moved_streams = [
        (p[:12], "seeded" if p in SEEDED else "greedy")
        for p, r in results.items()
        if r.timings.get("migrations")
    ]
    moved = len(moved_streams)
    print(
        f"\n{what}: {identical} of {len(results)} streams identical to the undisturbed run "
        f"(tokens and text), {moved} of them moved: {moved_streams}"
    )
    problems = [
        f"{p[:20]!r}: {len(r.tokens)} tokens, done={r.done}, errors={r.errors}, {r.failure}"
        for p, r in results.items()
        if not r.ended_properly or r.errors or (r.tokens, r.text) != reference[p]
    ]
    assert not problems, "; ".join(problems)
    assert all("migrations" in r.timings for r in results.values()), "a final message's timings"
    return identical, moved


def _back_to_baseline(cluster: ClusterHarness, decodes: int) -> None:
    def settled() -> bool:
        pools = sorted(pool for pool, _, _ in cluster.instances())
        return pools == sorted(["prefill"] + ["decode"] * decodes)

    wait_until(settled, 240.0, f"one prefill and {decodes} decode replicas", 0.5)
    assert cluster.leaks(timeout_s=30.0) == []


def test_streams_on_a_killed_decode_replica_move_and_keep_their_text(
    cluster: ClusterHarness, reference: Reference
) -> None:
    _back_to_baseline(cluster, 2)
    before = _migrations(cluster)
    running = _streams(cluster)
    states = [s for s in cluster.worker_states() if s.pool == "decode"]
    victim = max(states, key=lambda s: s.num_streams)
    assert victim.num_streams > 0
    (address,) = [a for i, a in _decodes(cluster) if i == victim.instance_id]
    os.kill(replica_pid("decode", address), signal.SIGKILL)
    results = _join(running)
    counted = _migrations(cluster) - before
    identical, moved = _check("decode SIGKILL", results, reference)
    print(f"decode SIGKILL: {victim.num_streams} streams on the victim, {counted:.0f} migrations")
    assert identical == len(PROMPTS + SEEDED) and moved > 0 and counted >= moved
    _back_to_baseline(cluster, 2)  # Serve replaced the replica


def test_a_scale_down_drains_its_replica_by_moving_the_streams(
    cluster: ClusterHarness, reference: Reference
) -> None:
    _back_to_baseline(cluster, 2)
    before = _migrations(cluster)
    running = _streams(cluster)
    cluster.scale("decode", 1)
    scaled_at = time.monotonic()
    results = _join(running)
    counted = _migrations(cluster) - before
    identical, moved = _check("decode scale-down 2 -> 1", results, reference)
    wait_until(lambda: len(_decodes(cluster)) == 1, 60.0, "the stopped replica gone", 0.2)
    print(
        f"decode scale-down: {counted:.0f} migrations; the stopped replica had left the "
        f"registry {time.monotonic() - scaled_at:.1f} s after the scale"
    )
    assert identical == len(PROMPTS + SEEDED) and moved > 0 and counted >= moved
    _back_to_baseline(cluster, 1)
