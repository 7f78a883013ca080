"""A disaggregated cluster (one prefill and one decode replica, KV over torch_dist/Gloo)
on local Ray: conditional disaggregation, greedy identity with the single-process
engine on both paths, prefix-aware routing, cancellation in both pools, and an instance
that stops heartbeating leaving the registry within one lease TTL."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import (
    LONG_PROMPTS,
    MAX_TOKENS,
    ClusterHarness,
    greedy,
    greedy_references,
    tiny_config,
    wait_until,
)

from cluster.client import AsyncClient, Sampling
from engine import LLM, SamplingParams
from engine.block_hash import chain_hashes

pytestmark = pytest.mark.slow

THRESHOLD = 16
# Each of LONG_PROMPTS is used by one test only: a repeat finds its blocks cached on
# the decode instance and is (rightly) no longer disaggregated.
SHORT = ["Hi there", "2 + 2 ="]
GREEDY = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
LEASE_TTL_S = 3.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "disagg",
        [
            "pools.prefill.engine.kv_cache_bytes=4MiB",
            "pools.decode.engine.kv_cache_bytes=4MiB",
            f"router.disaggregation_threshold={THRESHOLD}",
            f"redis.lease_ttl_s={LEASE_TTL_S}",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def reference(reference_llm: LLM) -> dict[str, list[int]]:
    return greedy_references(reference_llm, LONG_PROMPTS, SHORT, THRESHOLD)


def test_long_prompt_is_prefilled_remotely_and_matches(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    with cluster.client() as c:
        done = c.generate(LONG_PROMPTS[0], GREEDY)
    assert list(done.token_ids) == reference[LONG_PROMPTS[0]]
    t = done.timings
    assert t.disaggregated
    assert t.prefill_ms > 0 and t.kv_transfer_ms >= 0 and t.ttft_ms >= t.prefill_ms
    assert t.queue_ms + t.prefill_ms + t.kv_transfer_ms == pytest.approx(t.ttft_ms, abs=0.01)
    assert done.usage.completion_tokens == MAX_TOKENS


def test_short_prompt_is_prefilled_on_decode_and_matches(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    with cluster.client() as c:
        for prompt in SHORT:
            done = c.generate(prompt, GREEDY)
            assert list(done.token_ids) == reference[prompt]
            assert not done.timings.disaggregated and done.timings.kv_transfer_ms == 0


def test_concurrent_mixed_streams_over_grpc_and_http(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    async def run() -> tuple[list[tuple[str, list[int], bool]], list[int]]:
        async with AsyncClient(cluster.grpc_target, token=cluster.token) as c:

            async def one(prompt: str) -> tuple[str, list[int], bool]:
                done = await c.generate(prompt, GREEDY)
                return prompt, list(done.token_ids), done.timings.disaggregated

            def http() -> list[int]:
                body = {
                    "prompt": LONG_PROMPTS[1],
                    "max_tokens": MAX_TOKENS,
                    "temperature": 0,
                    "ignore_eos": True,
                }
                events = cluster.sse("/v1/completions", {**body, "stream": True})
                return [t for e in events for t in e["choices"][0]["token_ids"]]

            grpc_results, http_tokens = await asyncio.gather(
                asyncio.gather(*(one(p) for p in [LONG_PROMPTS[2], LONG_PROMPTS[3], *SHORT])),
                asyncio.to_thread(http),
            )
            return list(grpc_results), http_tokens

    results, http_tokens = asyncio.run(run())
    for prompt, tokens, disagg in results:
        assert tokens == reference[prompt], prompt
        assert disagg == (prompt in LONG_PROMPTS), prompt
    assert http_tokens == reference[LONG_PROMPTS[1]]


def test_first_token_logprob_comes_from_the_prefill_instance(
    cluster: ClusterHarness, reference_llm: LLM
) -> None:
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
    want = reference_llm.generate([LONG_PROMPTS[4]], params)[0]
    assert want.logprobs is not None
    with cluster.client() as c:
        done = c.generate(
            LONG_PROMPTS[4], Sampling(temperature=0, max_tokens=4, ignore_eos=True, logprobs=2)
        )
    assert done.timings.disaggregated
    assert list(done.token_ids) == want.token_ids
    assert done.logprobs == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)


def test_seeded_sampling_continues_the_prefill_instance_stream(
    cluster: ClusterHarness, reference_llm: LLM
) -> None:
    # The decode instance resumes the seeded generator where the prefill one stopped.
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=4242, max_tokens=8, ignore_eos=True)
    want = reference_llm.generate([LONG_PROMPTS[7]], params)[0]
    with cluster.client() as c:
        done = c.generate(
            LONG_PROMPTS[7],
            Sampling(temperature=1.0, top_p=0.9, seed=4242, max_tokens=8, ignore_eos=True),
        )
    assert done.timings.disaggregated
    assert list(done.token_ids) == want.token_ids


def test_cached_prefix_keeps_the_prompt_on_decode(
    cluster: ClusterHarness, reference_llm: LLM
) -> None:
    """The decode instance caches a remotely prefilled prompt's full blocks and publishes
    them; a repeat of that prompt then has too few uncached tokens to disaggregate."""
    prompt_ids = reference_llm.tokenizer.encode(LONG_PROMPTS[5])[:40]
    want = reference_llm.generate([prompt_ids], greedy())[0].token_ids
    hashes = chain_hashes(prompt_ids, 16)
    registry = cluster.registry
    assert registry is not None
    ((_, decode_id, _),) = [i for i in cluster.instances() if i[0] == "decode"]
    with cluster.client() as c:
        first = c.generate(token_ids=prompt_ids, sampling=GREEDY)
        assert first.timings.disaggregated and list(first.token_ids) == want
        wait_until(
            lambda: registry.overlap(hashes).get(decode_id, 0) >= 2, 10.0, "blocks published"
        )
        time.sleep(0.5)  # a few router refreshes
        second = c.generate(token_ids=prompt_ids, sampling=GREEDY)
    assert not second.timings.disaggregated
    assert second.usage.cached_prompt_tokens == 32  # two full blocks of 16
    assert list(second.token_ids) == want


def test_cancel_frees_blocks_in_both_pools(cluster: ClusterHarness) -> None:
    with cluster.client() as c:
        stream = c.stream(LONG_PROMPTS[6], Sampling(temperature=0, max_tokens=200, ignore_eos=True))
        got = [next(stream), next(stream)]
        assert not any(chunk.finish_reason for chunk in got)
        by_pool = {s.pool: s for s in cluster.worker_states()}
        assert by_pool["decode"].num_requests == 1
        assert by_pool["decode"].free_blocks < by_pool["decode"].total_blocks
        stream.close()

    def clean() -> bool:
        return all(
            s.num_requests == 0 and s.free_blocks == s.total_blocks and s.active_transfers == 0
            for s in cluster.worker_states()
        )

    wait_until(clean, 20.0, "both pools clean after cancel")


def test_instance_that_stops_heartbeating_leaves_within_one_ttl(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    assert cluster.registry is not None
    ((_, prefill_id, address),) = [i for i in cluster.instances() if i[0] == "prefill"]
    cluster.call("prefill", address, "suspend_heartbeat")
    try:
        gone = wait_until(
            lambda: prefill_id not in {i.instance_id for i in cluster.registry.live_instances()},  # type: ignore[union-attr]
            LEASE_TTL_S + 2.0,
            "lease expiry",
            step_s=0.05,
        )
        assert gone <= LEASE_TTL_S + 0.5, gone
        with cluster.client() as c:
            wait_until(
                lambda: not c.cluster_status().pools[0].instances, 2.0, "router view drops it"
            )
            done = c.generate(LONG_PROMPTS[0][::-1], GREEDY)  # fresh and long; no prefill instance
        assert not done.timings.disaggregated
    finally:
        cluster.call("prefill", address, "resume_heartbeat")
    with cluster.client() as c:
        wait_until(lambda: c.cluster_status().ready, 10.0, "prefill instance back")
        time.sleep(0.5)
        again = c.generate(LONG_PROMPTS[2][::-1], GREEDY)
    assert again.timings.disaggregated
