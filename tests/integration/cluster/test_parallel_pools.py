"""Pools with their own TP/PP layouts on local Ray: prefill TP=2 and decode PP=2, each
replica's ranks in its own placement group, KV moving M:N (each prefill rank holds one
of the two KV heads of every layer; each decode rank needs both heads of half the
layers), over torch_dist (Gloo) and over shared memory. Greedy output equals the
single-process engine's on both paths, the placement groups have one bundle per rank,
and the other ranks' transfers are back to zero with everything else at teardown."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from cluster_harness import (
    LAYOUT_LONG_PROMPTS,
    LAYOUT_SHORT_PROMPTS,
    MAX_TOKENS,
    SPLIT_LAYOUTS,
    ClusterHarness,
    greedy,
    greedy_references,
    tiny_config,
    wait_until,
)

from cluster.client import AsyncClient, Sampling
from cluster.launcher import metrics_urls
from cluster.scrape import Samples, scrape
from engine import LLM

pytestmark = pytest.mark.slow

THRESHOLD = 16
LONG, SHORT = LAYOUT_LONG_PROMPTS, LAYOUT_SHORT_PROMPTS
GREEDY = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module", params=["torch_dist", "shm"])
def cluster(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        f"layouts-{request.param.replace('_', '-')}",
        [
            f"kv_transfer.transport={request.param}",
            *SPLIT_LAYOUTS,
            f"router.disaggregation_threshold={THRESHOLD}",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def reference(reference_llm: LLM) -> dict[str, list[int]]:
    return greedy_references(reference_llm, LONG, SHORT, THRESHOLD)


def test_each_replica_has_a_placement_group_with_a_bundle_per_rank(
    cluster: ClusterHarness,
) -> None:
    groups = [
        g
        for g in ray.util.placement_group_table().values()  # type: ignore[no-untyped-call]
        if g["state"] == "CREATED"
    ]
    layouts = sorted((g["strategy"], len(g["bundles"])) for g in groups)
    assert layouts == [("STRICT_PACK", 2), ("STRICT_PACK", 2)]
    for g in groups:
        assert all(b == {"CPU": 0.5} for b in g["bundles"].values())
    info = {i.pool: (i.tp, i.pp) for i in cluster.registry.live_instances()}  # type: ignore[union-attr]
    assert info == {"prefill": (2, 1), "decode": (1, 2)}


def test_disaggregated_and_local_prompts_match_the_single_engine(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    async def run() -> list[tuple[str, list[int], bool]]:
        async with AsyncClient(cluster.grpc_target, token=cluster.token) as c:

            async def one(prompt: str) -> tuple[str, list[int], bool]:
                done = await c.generate(prompt, GREEDY)
                return prompt, list(done.token_ids), done.timings.disaggregated

            return list(await asyncio.gather(*(one(p) for p in [*LONG, *SHORT])))

    results = asyncio.run(run())
    for prompt, tokens, disaggregated in results:
        assert tokens == reference[prompt], prompt
        assert disaggregated == (prompt in LONG), prompt
    for s in cluster.worker_states():
        assert s.remote_prefill_fallbacks == 0 and s.transfer_failures == 0, s


def test_http_stream_through_the_parallel_pools(
    cluster: ClusterHarness, reference_llm: LLM
) -> None:
    prompt = (
        "Explain in one sentence why the sky looks blue at noon and red at sunset, "
        "mentioning how far the light travels through the air."
    )
    (expected,) = reference_llm.generate([prompt], greedy())
    body = {"prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    events = cluster.sse("/v1/completions", {**body, "stream": True})
    tokens = [t for e in events for t in e["choices"][0]["token_ids"]]
    assert tokens == expected.token_ids


def test_every_rank_exports_its_own_transfers(cluster: ClusterHarness) -> None:
    prompt = (
        "A cartographer drew the coast twice, once at low tide and once at high tide, and "
        "the two maps disagreed about almost every rock, bay and sandbar along the shore."
    )
    with cluster.client() as c:
        assert c.generate(prompt, GREEDY).timings.disaggregated
    urls = metrics_urls()

    def ranks(s: Samples, role: str, pool: str) -> set[str]:
        series = s.get("pdserve_kv_transfers_completed_total", role=role, pool=pool)
        return {x.labels["rank"] for x in series if x.value >= 1}

    def every_rank() -> bool:
        s = scrape(urls)
        up = {(x.labels["pool"], x.labels["rank"]) for x in s.get("pdserve_up")}
        return (
            {("prefill", "0"), ("prefill", "1"), ("decode", "0"), ("decode", "1")} <= up
            and ranks(s, "send", "prefill") == {"0", "1"}
            and ranks(s, "recv", "decode") == {"0", "1"}
        )

    # each rank actor, a process of its own, reports under its replica and rank
    wait_until(every_rank, 60, "every rank's transfers in one scrape", step_s=0.5)
