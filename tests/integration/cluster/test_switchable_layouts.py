"""Switchable pools (`planner.enabled`) with their own TP/PP layouts on local Ray:
prefill TP=2 and decode PP=2, every rank holding both roles' transfer objects. With
the routing table as the config has it, long prompts go prefill -> decode; with the two
instances' roles swapped in the table (what the controller writes), the PP=2 instance
of the decode pool prefills them and pushes their KV M:N into the TP=2 instance of the
prefill pool, which decodes. Greedy output equals the single-process engine's both
ways, and everything is back to baseline at teardown."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import (
    LAYOUT_LONG_PROMPTS,
    LAYOUT_SHORT_PROMPTS,
    MAX_TOKENS,
    SPLIT_LAYOUTS,
    ClusterHarness,
    greedy_references,
    tiny_config,
)

from cluster.client import Sampling
from engine import LLM
from registry import Role

pytestmark = pytest.mark.slow

THRESHOLD = 16
LONG, SHORT = LAYOUT_LONG_PROMPTS, LAYOUT_SHORT_PROMPTS
GREEDY = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "switch-layouts",
        [
            "planner.enabled=true",
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


def _pushed(cluster: ClusterHarness) -> dict[str, tuple[int, int]]:
    """(prefills pushed, remote prefills landed) by pool."""
    out = {}
    for s in cluster.worker_states():
        out[s.pool] = (s.extra["prefills_pushed"], s.extra["remote_prefills_landed"])
    return out


def test_roles_swapped_in_the_table_move_kv_the_other_way(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    registry = cluster.registry
    assert registry is not None
    ids = {pool: iid for pool, iid, _ in cluster.instances()}
    with cluster.client() as c:
        done = c.generate(LONG[0], GREEDY)
        assert done.timings.disaggregated and list(done.token_ids) == reference[LONG[0]]
        assert _pushed(cluster) == {"prefill": (1, 0), "decode": (0, 1)}

        registry.routing.set_role(ids["prefill"], Role.DECODE)
        registry.routing.set_role(ids["decode"], Role.PREFILL)
        time.sleep(1.0)  # the router's next refresh
        for prompt in LONG[1:]:
            done = c.generate(prompt, GREEDY)
            assert done.timings.disaggregated, prompt
            assert list(done.token_ids) == reference[prompt], prompt
        for prompt in SHORT:  # prefilled locally by the instance now decoding
            done = c.generate(prompt, GREEDY)
            assert not done.timings.disaggregated and list(done.token_ids) == reference[prompt]
        n = len(LONG) - 1
        assert _pushed(cluster) == {"prefill": (1, n), "decode": (n, 1)}

        registry.routing.clear()
        time.sleep(1.0)
    assert registry.routing.read().roles == {}
