"""A TP/PP replica whose other rank dies: requests fail fast instead of hanging, the
replica fails its health check, and Serve replaces it with one that serves the same
greedy tokens. One colocated pool with PP=2 on local Ray; the rank's process is killed
with SIGKILL, as a crash would end it."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from cluster_harness import MAX_TOKENS, ClusterHarness, greedy, tiny_config, wait_until

from benchmarks.fault_load import rank_actor_pids
from cluster.client import ClientError, Sampling
from engine import LLM

pytestmark = pytest.mark.slow

PROMPT = "The capital of France is"
GREEDY = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
RECOVERY_S = 240.0


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "rank-failure",
        [
            "pools=[{name: main, role: colocated, pp: 2, resources_per_rank: {CPU: 0.5}, "
            "rank_timeout_s: 10, engine: {kv_cache_bytes: 4MiB}}]",
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


def test_a_killed_rank_fails_requests_fast_and_the_replica_is_replaced(
    cluster: ClusterHarness, reference_llm: LLM
) -> None:
    want = reference_llm.generate([PROMPT], greedy())[0].token_ids
    with cluster.client() as c:
        assert list(c.generate(PROMPT, GREEDY).token_ids) == want
    (before,) = [i.instance_id for i in cluster.registry.live_instances()]  # type: ignore[union-attr]
    (pid,) = rank_actor_pids()
    os.kill(pid, signal.SIGKILL)

    began = time.monotonic()
    with cluster.client() as c:
        try:  # the dead rank's replica may already be gone; if not, this fails fast
            c.generate(PROMPT, GREEDY, timeout_s=60)
        except ClientError as e:  # retryable: the instance is gone, not the request bad
            assert e.code is grpc.StatusCode.UNAVAILABLE, e
    assert time.monotonic() - began < 60, "a request to the broken replica hung"

    def recovered() -> bool:
        live = [i.instance_id for i in cluster.registry.live_instances()]  # type: ignore[union-attr]
        if live == [before] or len(live) != 1:
            return False
        try:
            with cluster.client() as c:
                return list(c.generate(PROMPT, GREEDY, timeout_s=30).token_ids) == want
        except ClientError:
            return False

    wait_until(recovered, RECOVERY_S, "a replacement replica serving the same tokens", 2.0)
    assert len(rank_actor_pids()) == 1
