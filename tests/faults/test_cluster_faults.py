"""Faults around the pools, on one local cluster: two router replicas, one prefill
replica of two pipeline ranks and one decode replica (tiny model, KV over
torch_dist/Gloo, each KV message delayed so that transfers are in flight), each router
holding at most `CAPACITY` requests.

In order, each under concurrent streamed load and compared with the single engine's
greedy text, each ending with leak checks:
  - a 5x overload step: what is refused gets 429 / RESOURCE_EXHAUSTED, fast against a
    served request's first token, and what is accepted completes with its text;
  - a cancel storm: 200 requests abandoned by their clients at every stage (queued,
    prefilling, transferring, decoding), half by gRPC cancel and half by closing the
    HTTP connection; nothing is left behind and the cluster still serves the same text;
  - Redis paused (SIGSTOP) for 30 s: the routers serve from their last view, every
    request completes, no worker restarts, and leases and loads come back;
  - the prefill replica's second pipeline rank (an actor) SIGKILLed while transfers
    are in flight: every request still gets its text (the decode instance prefills
    what the broken instance cannot), and Serve replaces the instance;
  - one of the two router replicas SIGKILLed: streams it carried break with
    UNAVAILABLE, and the client library continues each on the other router with the
    tokens it has (no break, the greedy text); new calls succeed.
The routers' health checks are asked every 0.25 s throughout (1 s deadline); they
must answer in time through every fault but the overload (whose 80 arrivals share
Serve's proxy with them) and the router's own death, where the figures are reported
(2% of the checks may be late: a loaded host delays a few).
"""

from __future__ import annotations

import os
import random
import re
import signal
import statistics
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from cancel_storm import cancel_over_grpc, cancel_over_http
from cluster_harness import LONG_PROMPTS, ClusterHarness, tiny_config, wait_until

from benchmarks.fault_load import (
    MAX_MODEL_LEN,
    GrpcStream,
    HealthWatch,
    SseStream,
    StreamResult,
    rank_actor_pids,
    replica_pids,
)
from cluster.client import Client, ClientError, Sampling
from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

THRESHOLD = 16
CAPACITY = 8  # router.max_inflight_requests, per router replica
STORM_CONCURRENCY = 10  # of the cancel storm (a refused one counts as not cancelled)
MAX_TOKENS = 160
READ_TIMEOUT_S = 30.0
SHORT = ["Hi there", "2 + 2 =", "The sky is", "Once upon a"]
_INFLIGHT = re.compile(r"^pdserve_inflight_requests(?:\{[^}]*\})? (\S+)$", re.M)
SAMPLING = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "faults2",
        [
            f"model.max_model_len={MAX_MODEL_LEN}",
            "router.replicas=2",
            "router.num_cpus=0.5",
            f"router.max_inflight_requests={CAPACITY}",
            "pools.prefill.engine.kv_cache_bytes=8MiB",
            "pools.prefill.pp=2",
            "pools.prefill.resources_per_rank={CPU: 0.5}",
            "pools.prefill.rank_timeout_s=30",
            "pools.decode.engine.kv_cache_bytes=16MiB",
            f"router.disaggregation_threshold={THRESHOLD}",
            "kv_transfer.faults=[{kind: delay, times: 0, delay_s: 0.05}]",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


class References:
    """The single engine's greedy tokens, computed on first use per prompt."""

    def __init__(self, llm: LLM) -> None:
        self._llm = llm
        self._known: dict[str, list[int]] = {}

    def __getitem__(self, prompt: str) -> list[int]:
        return self.many([prompt])[0]

    def many(self, prompts: list[str]) -> list[list[int]]:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._known]
        if todo:
            params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
            for p, out in zip(todo, self._llm.generate(todo, params), strict=True):
                self._known[p] = out.token_ids
        return [self._known[p] for p in prompts]


@pytest.fixture(scope="module")
def reference(reference_llm: LLM) -> References:
    refs = References(reference_llm)
    refs.many(SHORT + LONG_PROMPTS)
    return refs


def fresh_long(i: int) -> str:
    """A long prompt no earlier request shares a first block with (no prefix hit, so the
    prefill pool prefills it and its KV is transferred)."""
    return f"Request {i}. {LONG_PROMPTS[i % len(LONG_PROMPTS)]}"


def _body(prompt: str) -> dict[str, object]:
    return {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}


def _sse(cluster: ClusterHarness, prompt: str) -> SseStream:
    return SseStream(cluster.config.server.http_port, _body(prompt), READ_TIMEOUT_S).start()


def _grpc(cluster: ClusterHarness, prompt: str) -> GrpcStream:
    return GrpcStream(cluster.grpc_target, prompt, SAMPLING, 4 * READ_TIMEOUT_S).start()


def _join(streams: dict[str, SseStream | GrpcStream]) -> dict[str, StreamResult]:
    deadline = time.monotonic() + 3 * READ_TIMEOUT_S
    return {p: s.join(max(1.0, deadline - time.monotonic())) for p, s in streams.items()}


def _wrong(results: dict[str, StreamResult], reference: References) -> list[str]:
    """Streams that did not end with [DONE] and exactly the greedy tokens."""
    return [
        f"{p[:20]!r}: {r.failure or r.errors or f'{len(r.tokens)} tokens, not the greedy text'}"
        for p, r in results.items()
        if not r.ended_properly or r.errors or r.tokens != reference[p]
    ]


def _inflight_reads(cluster: ClusterHarness, reads: int = 6) -> list[float]:
    """The routers' in-flight gauge, read several times (the proxy picks a replica)."""
    out = []
    for _ in range(reads):
        body = cluster.http("GET", "/metrics", timeout_s=10).body.decode()
        out += [float(m[1]) for m in _INFLIGHT.finditer(body)]
    assert out, "no pdserve_inflight_requests in /metrics"
    return out


def _assert_no_leaks(cluster: ClusterHarness) -> None:
    assert not cluster.leaks(timeout_s=30.0), cluster.leaks(timeout_s=1.0)
    assert wait_until(lambda: not any(_inflight_reads(cluster)), 30.0, "routers idle") >= 0
    pools = sorted(pool for pool, _, _ in cluster.instances())
    assert pools == ["decode", "prefill"], pools


def _serves_the_same_text(cluster: ClusterHarness, reference: References) -> None:
    streams: dict[str, SseStream | GrpcStream] = {p: _sse(cluster, p) for p in LONG_PROMPTS[:3]}
    streams.update({p: _grpc(cluster, p) for p in SHORT[:2]})
    assert not _wrong(_join(streams), reference)


def _assert_answered(watch: HealthWatch) -> None:
    """The health checks answered through the fault: a router stuck on the fault misses
    every check while it lasts; on this shared host a few answer just past the 1 s
    deadline under load, and are only reported."""
    assert len(watch.missed) <= max(2, watch.checks // 50), watch.missed


def _health_report(what: str, watch: HealthWatch, since: float) -> str:
    missed = [(m.what, round(m.at - since, 1), round(m.took_s, 2)) for m in watch.missed]
    return f"{what}: health checks {watch.checks}, missed {missed}"


def test_an_overload_step_is_refused_fast_and_the_accepted_requests_complete(
    cluster: ClusterHarness, reference: References
) -> None:
    # Baseline: a load the routers take whole, then 5x the capacity of both routers.
    base = {p: _sse(cluster, p) for p in [*SHORT, *LONG_PROMPTS[:4]]}
    baseline = _join(base)  # type: ignore[arg-type]
    assert not _wrong(baseline, reference)
    prompts = [*SHORT, *LONG_PROMPTS]
    sent: dict[str, SseStream | GrpcStream] = {}
    with HealthWatch(cluster.grpc_target, cluster.config.server.http_port) as watch:
        began = time.monotonic()
        for i in range(5 * 2 * CAPACITY):
            prompt = prompts[i % len(prompts)]
            key = f"{i:03d}|{prompt}"
            sent[key] = _grpc(cluster, prompt) if i % 4 == 3 else _sse(cluster, prompt)
        results = _join(sent)
    accepted = {k: r for k, r in results.items() if r.status == 200 or (r.tokens and not r.errors)}
    refused = {k: r for k, r in results.items() if k not in accepted}
    refusal_s = sorted(r.ended - r.started for r in refused.values())
    ttft = [r.ttft for r in accepted.values()]
    e2e = [r.ended - r.started for r in accepted.values()]
    base_ttft = statistics.median(r.ttft for r in baseline.values())
    print(
        f"\noverload: {len(sent)} sent within "
        f"{max(r.started for r in results.values()) - began:.2f} s, "
        f"{len(accepted)} accepted, {len(refused)} refused; refusal took p50 "
        f"{statistics.median(refusal_s) * 1000:.0f} ms, p90 "
        f"{refusal_s[int(0.9 * len(refusal_s))] * 1000:.0f} ms, max {refusal_s[-1] * 1000:.0f} ms; "
        f"accepted TTFT median {statistics.median(ttft) * 1000:.0f} ms, end to end "
        f"{statistics.median(e2e) * 1000:.0f} ms (TTFT at "
        f"{len(baseline)} concurrent: {base_ttft * 1000:.0f} ms); "
        + _health_report("", watch, began)
    )
    problems = []
    for key, r in refused.items():
        how = r.failure if r.status else str(r.errors)
        if not (how.startswith("http 429") or "RESOURCE_EXHAUSTED" in how):
            problems.append(f"{key[:24]!r}: {how[:120]}")
    assert not problems, problems
    assert len(refused) >= len(sent) - 2 * CAPACITY
    assert len(accepted) >= CAPACITY
    assert not _wrong({k.split("|", 1)[1]: r for k, r in accepted.items()}, reference)
    # A refusal waits on no engine: it takes less than serving a request. (Against the
    # first token, on this 2-core host, the proxy's queue of 80 arrivals dominates; the
    # figures are printed above.)
    assert refusal_s[int(0.9 * len(refusal_s))] < statistics.median(e2e)
    _assert_no_leaks(cluster)


def test_a_cancel_storm_leaves_nothing_behind(
    cluster: ClusterHarness, reference: References
) -> None:
    rng = random.Random(7)
    port, target = cluster.config.server.http_port, cluster.grpc_target
    transfers_seen = 0

    def one(i: int) -> tuple[str, int]:
        prompt = fresh_long(i) if i % 3 else SHORT[i % len(SHORT)]
        after = 0 if i % 2 == 0 else rng.randint(1, 8)
        delay = rng.uniform(0.0, 0.3)
        if i % 4 < 2:
            return "http", cancel_over_http(port, _body(prompt), delay, after, READ_TIMEOUT_S)
        return "grpc", cancel_over_grpc(target, prompt, SAMPLING, delay, after, READ_TIMEOUT_S)

    with HealthWatch(target, port) as watch:
        began = time.monotonic()
        with ThreadPoolExecutor(STORM_CONCURRENCY) as pool:
            futures = [pool.submit(one, i) for i in range(200)]
            while not all(f.done() for f in futures):
                states = cluster.worker_states()
                transfers_seen += sum(1 for s in states if s.active_transfers)
                time.sleep(1.0)
            outcomes = [f.result(timeout=1.0) for f in futures]
    counts: dict[tuple[str, str], int] = {}
    for how, seen in outcomes:
        if seen >= 0:
            stage = (how, "decoding" if seen else "before the first token")
            counts[stage] = counts.get(stage, 0) + 1
    print(
        f"\ncancel storm: {len(outcomes)} requests in {time.monotonic() - began:.1f} s, "
        f"cancelled {sum(1 for _, seen in outcomes if seen >= 0)} ({counts}), ended "
        f"before the cancel {sum(1 for _, seen in outcomes if seen < 0)}; polls that saw a "
        f"transfer in flight: {transfers_seen}; " + _health_report("", watch, began)
    )
    assert sum(1 for _, seen in outcomes if seen >= 0) >= 180
    assert len(counts) == 4, counts
    assert transfers_seen > 0
    _assert_answered(watch)
    _assert_no_leaks(cluster)
    _serves_the_same_text(cluster, reference)
    _assert_no_leaks(cluster)


def test_a_paused_redis_costs_no_request(cluster: ClusterHarness, reference: References) -> None:
    before = {iid for _, iid, _ in cluster.instances()}
    port = cluster.config.server.http_port
    with HealthWatch(cluster.grpc_target, port) as watch:
        streams: dict[str, SseStream | GrpcStream] = {p: _sse(cluster, p) for p in LONG_PROMPTS[:3]}
        streams.update({p: _grpc(cluster, p) for p in SHORT[:2]})
        wait_until(lambda: all(s.result.reads for s in streams.values()), 60.0, "first tokens")
        os.kill(cluster.redis.pid, signal.SIGSTOP)
        paused_at = time.monotonic()
        try:
            wave = 0
            while time.monotonic() - paused_at < 30.0:
                streams[fresh_long(100 + wave)] = _sse(cluster, fresh_long(100 + wave))
                streams[SHORT[wave % len(SHORT)] + " "] = _grpc(cluster, SHORT[wave % 4] + " ")
                wave += 1
                time.sleep(min(5.0, max(0.0, 30.0 - (time.monotonic() - paused_at))))
        finally:
            os.kill(cluster.redis.pid, signal.SIGCONT)
        resumed_at = time.monotonic()
        reference.many(list(streams))
        results = _join(streams)
        recovered = wait_until(
            lambda: {iid for _, iid, _ in cluster.instances()} == before, 30.0, "leases back"
        )
        stall = max(r.longest_gap_after(paused_at) for r in results.values())
        print(
            f"\nRedis paused {resumed_at - paused_at:.1f} s: {len(results)} streams "
            f"({len(results) - 5} sent during the pause), longest wait for a byte {stall:.1f} s, "
            f"leases back {recovered:.1f} s after SIGCONT; " + _health_report("", watch, paused_at)
        )
        for p, r in results.items():
            print(
                f"  {p[:24]!r}: {len(r.tokens)} tokens, ttft {r.ttft:.1f} s, longest gap "
                f"{r.longest_gap_after(r.started):.1f} s, {r.failure or r.errors or 'ok'}"
            )
        wrong = _wrong(results, reference)
    assert not wrong, wrong
    _assert_answered(watch)
    # The same instances: no worker restarted, and their load reports are fresh again.
    assert {s.instance_id for s in cluster.worker_states()} == before
    _assert_no_leaks(cluster)
    _serves_the_same_text(cluster, reference)


def test_a_killed_rank_costs_no_request_and_its_instance_is_replaced(
    cluster: ClusterHarness, reference: References
) -> None:
    (before,) = [(iid, addr) for pool, iid, addr in cluster.instances() if pool == "prefill"]
    port = cluster.config.server.http_port
    prompts = [fresh_long(200 + i) for i in range(4)]
    reference.many([*prompts, fresh_long(210), fresh_long(211)])
    with HealthWatch(cluster.grpc_target, port) as watch:
        streams: dict[str, SseStream | GrpcStream] = {p: _sse(cluster, p) for p in prompts}
        streams[SHORT[0]] = _grpc(cluster, SHORT[0])

        def transferring() -> bool:
            return cluster.call("prefill", before[1], "state").active_transfers > 0

        wait_until(transferring, 60.0, "a KV transfer in flight", 0.05)
        (pid,) = rank_actor_pids()
        os.kill(pid, signal.SIGKILL)
        killed_at = time.monotonic()
        streams[fresh_long(210)] = _sse(cluster, fresh_long(210))
        streams[SHORT[1]] = _grpc(cluster, SHORT[1])
        results = _join(streams)
        stall = max(r.longest_gap_after(killed_at) for r in results.values())
    # Every request ended with its full text: a prompt whose prefill died with the rank
    # was prefilled again by the decode instance.
    wrong = _wrong(results, reference)
    print(
        f"\nrank SIGKILL: {len(results)} streams, longest wait for a byte after the death "
        f"{stall:.1f} s, wrong {wrong}; " + _health_report("", watch, killed_at)
    )
    assert not wrong, wrong
    _assert_answered(watch)

    def replaced() -> bool:
        now = [iid for pool, iid, _ in cluster.instances() if pool == "prefill"]
        return len(now) == 1 and now[0] != before[0] and len(rank_actor_pids()) == 1

    took = wait_until(replaced, 240.0, "a new prefill instance", 1.0)
    print(f"prefill instance replaced {took:.0f} s after the death was seen")
    with Client(cluster.grpc_target, timeout_s=120) as client:
        done = client.generate(fresh_long(211), SAMPLING)
    assert list(done.token_ids) == reference[fresh_long(211)]
    assert done.timings.disaggregated  # the new prefill instance serves
    _assert_no_leaks(cluster)


def test_a_killed_router_replica_costs_a_client_retry(
    cluster: ClusterHarness, reference: References
) -> None:
    routers = replica_pids("router")
    assert len(routers) == 2, routers
    port = cluster.config.server.http_port
    prompts = [*LONG_PROMPTS[:4], *SHORT]
    with HealthWatch(cluster.grpc_target, port) as watch:
        # 6 streams, and 2 calls at a time after the death: the surviving router holds
        # them all (CAPACITY) however the proxy split the streams.
        running = {p: _grpc(cluster, p) for p in prompts[:6]}
        wait_until(lambda: all(s.result.reads for s in running.values()), 60.0, "first tokens")
        victim = sorted(routers.values())[0]
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        with Client(cluster.grpc_target, timeout_s=120) as client, ThreadPoolExecutor(2) as pool:
            after = list(pool.map(lambda p: client.generate(p, SAMPLING).token_ids, prompts))
            retried_after = client.retries
        results = _join(running)  # type: ignore[arg-type]
    # A stream cut by the death ends with UNAVAILABLE; the client library continues it
    # on the other router with what it had (`resume`), and its caller sees no break.
    resumed = {p: r.resumes for p, r in results.items() if r.resumes}
    print(
        f"\nrouter SIGKILL: {len(results)} streams, {len(resumed)} continued by the client "
        f"({sum(resumed.values())} resumes), client retries after the death {retried_after}; "
        + _health_report("", watch, killed_at)
    )
    assert resumed, "the killed router carried no stream"
    assert not _wrong(results, reference)
    assert [list(t) for t in after] == reference.many(prompts)
    # The retry is bounded: a dead address still fails.
    with pytest.raises(ClientError), Client("127.0.0.1:1", timeout_s=5) as client:
        client.generate("x", SAMPLING)
    wait_until(lambda: len(replica_pids("router")) == 2, 120.0, "the router replaced")
    _assert_no_leaks(cluster)
