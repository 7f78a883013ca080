"""The controller on a running cluster (local Ray, the tiny model): one prefill and
two decode replicas, every one switchable. While short prompts run on the decode
instances alone, nothing flips. Then long prompts arrive from several clients at once
and queue on the one prefill instance: the controller flips a decode instance to
prefill in the routing table, and the router sends it prefills (through its own pool's
deployment), whose KV it pushes to the remaining decode instance. Every request
completes with the single-process engine's greedy tokens throughout; the run ends with
the leak checks and a routing table cleared by the controller's stop. The controller
records its snapshots, and replaying them through a fresh policy gives the decisions
it logged."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import (
    LONG_PROMPTS,
    MAX_TOKENS,
    ClusterHarness,
    generate_concurrently,
    tiny_config,
    wait_until,
)

from cluster.builder import controller_settings
from cluster.client import Sampling
from controller import actor
from controller.observe import Observer, Snapshot
from controller.policy import Policy
from engine import LLM, SamplingParams
from registry import Role

pytestmark = pytest.mark.slow

THRESHOLD = 16
GREEDY = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
SHORT = ["Hi there", "2 + 2 =", "Red, green,", "One two"]
# Unique long prompts: a repeat would find its blocks cached on a decode instance.
LONG = [f"Story {i}. {LONG_PROMPTS[i % len(LONG_PROMPTS)]}" for i in range(48)]
AFTER = [f"Tale {i}. {LONG_PROMPTS[i % len(LONG_PROMPTS)]}" for i in range(6)]
PLANNER = [
    "planner.enabled=true",
    "planner.fast_period_s=0.5",
    "planner.slow_period_s=30",
    "planner.sustain_ticks=2",
    "planner.flip_at=1.0",
    "planner.flip_margin=0.2",
    "planner.flip_cooldown_s=120",
    "planner.min_flip_interval_s=2",
    "planner.prefill_full_tokens=8",
    "planner.decode_full_seqs=64",
    "planner.ttft_slo_s=0.02",
    "planner.tpot_slo_s=30",
    "planner.threshold_min=16",
    "planner.threshold_max=16",
]
# Where to copy the run's recorded snapshots (to refresh tests/unit/controller/
# recorded/flip.jsonl, which test_replay.py replays); unset: nowhere.
RECORD_TO = os.environ.get("PDSERVE_CONTROLLER_RECORDING")


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "ctl",
        [
            "pools.prefill.engine.kv_cache_bytes=4MiB",
            "pools.prefill.engine.max_num_batched_tokens=64",
            "pools.decode.engine.kv_cache_bytes=4MiB",
            "pools.decode.replicas=2",
            f"router.disaggregation_threshold={THRESHOLD}",
            *PLANNER,
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir)).start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def reference(reference_llm: LLM) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    prompts = [*SHORT, *LONG, *AFTER]
    outs = reference_llm.generate(prompts, params)
    return {p: list(o.token_ids) for p, o in zip(prompts, outs, strict=True)}


def _flips(cluster: ClusterHarness) -> list[dict[str, object]]:
    assert cluster.registry is not None
    return [d for d in cluster.registry.routing.decisions() if d["kind"] in ("flip", "repair")]


def _clients(
    cluster: ClusterHarness, prompts: list[str], threads: int
) -> tuple[list[tuple[str, list[int]]], list[BaseException]]:
    return generate_concurrently(cluster, prompts, threads, GREEDY)


def _check(results: tuple[list[tuple[str, list[int]]], list[BaseException]], n: int,
           reference: dict[str, list[int]]) -> None:  # fmt: skip
    done, errors = results
    assert not errors, errors
    assert len(done) == n
    for prompt, tokens in done:
        assert tokens == reference[prompt], prompt


def test_a_prompt_heavy_shift_flips_a_decode_instance_to_prefill(
    cluster: ClusterHarness, reference: dict[str, list[int]], tmp_path: Path
) -> None:
    registry = cluster.registry
    assert registry is not None
    record = tmp_path / "snapshots.jsonl"
    settings = controller_settings(cluster.config, cluster.redis.url)
    actor.start(settings, str(record))
    try:
        # Short prompts only: prefilled on the decode instances; nothing to flip.
        _check(_clients(cluster, SHORT * 3, 2), len(SHORT) * 3, reference)
        time.sleep(2.0)
        assert _flips(cluster) == []

        # Long prompts from 6 clients: they queue on the one prefill instance.
        _check(_clients(cluster, LONG, 6), len(LONG), reference)
        wait_until(lambda: bool(_flips(cluster)), 30.0, "a role flip", step_s=0.5)
        (flip,) = _flips(cluster)
        assert flip["to_role"] == "prefill"
        flipped = str(flip["instance"])
        assert registry.routing.read().roles == {flipped: Role.PREFILL}
        time.sleep(1.0)  # the router's next refresh

        # The flipped decode instance now takes prefills and pushes their KV.
        before = {s.instance_id: s.extra for s in cluster.worker_states()}
        _check(_clients(cluster, AFTER, 2), len(AFTER), reference)
        after = {s.instance_id: s.extra for s in cluster.worker_states()}
        assert after[flipped]["prefills_pushed"] > before[flipped]["prefills_pushed"]
        assert after[flipped]["remote_prefills_landed"] == before[flipped]["remote_prefills_landed"]
    finally:
        actor.stop(cluster.config.name)
    assert registry.routing.read().roles == {}

    logged = registry.routing.decisions()
    lines = record.read_text().splitlines()
    replay = Policy(
        settings.planner,
        settings.prefill_pool,
        settings.decode_pool,
        settings.replicas,
        settings.initial_threshold,
    )
    observer = Observer()
    decided = [
        a.record()
        for line in lines
        for a in replay.fast(observer.observe(Snapshot.from_json(line)))
    ]
    assert decided == logged
    if RECORD_TO:
        out = Path(RECORD_TO)
        out.mkdir(parents=True, exist_ok=True)
        (out / "snapshots.jsonl").write_text(record.read_text())
