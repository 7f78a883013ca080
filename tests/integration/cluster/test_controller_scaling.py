"""The controller's slow loop on a running cluster (local Ray, the tiny model): the
application runs the controller as a deployment of its own (as a RayService does) and
is deployed with Serve's external scaler. While the cluster idles nothing scales; long
prompts from several clients then queue on the one prefill instance, and the
controller asks Serve, through the external scaler, for a second prefill replica. Serve
starts it without redeploying: every replica that ran before (router and pools) is the
same actor, with the same pid, afterwards. The new replica registers, greedy outputs
still match the single-process engine, and the run ends with the leak checks, the
controller having cleared the routing table and released its lease. A controller
replica killed outright is replaced by Serve, and the new one acts once the dead one's
lease expired."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from cluster_harness import (
    LONG_PROMPTS,
    MAX_TOKENS,
    ClusterHarness,
    generate_concurrently,
    tiny_config,
    wait_until,
)
from ray import serve

from cluster.builder import APP_NAME
from cluster.client import Sampling
from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

GREEDY = Sampling(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
LONG = [f"Saga {i}. {LONG_PROMPTS[i % len(LONG_PROMPTS)]}" for i in range(36)]
AFTER = [f"Fable {i}. {LONG_PROMPTS[i % len(LONG_PROMPTS)]}" for i in range(4)]
PLANNER = [
    "planner.enabled=true",
    "planner.scaling=true",
    "planner.fast_period_s=0.5",
    "planner.slow_period_s=2",
    "planner.scale_up_at=0.5",
    "planner.scale_down_at=0.01",
    "planner.scale_cooldown_s=600",  # one change in this test
    "planner.max_replicas=2",
    "planner.prefill_full_tokens=1",  # any queued prompt: prefill is busy
    "planner.ttft_slo_s=0.01",
    "planner.decode_full_seqs=64",  # decode never is
    "planner.tpot_slo_s=30",
    "planner.flip_at=1000",  # no flips: the slow loop alone answers the load
    "planner.threshold_min=16",
    "planner.threshold_max=16",
]


@pytest.fixture(scope="module")
def cluster(tiny_model_dir: Path) -> Iterator[ClusterHarness]:
    config = tiny_config(
        str(tiny_model_dir),
        "ctlscale",
        [
            "pools.prefill.engine.kv_cache_bytes=4MiB",
            "pools.prefill.engine.max_num_batched_tokens=64",
            "pools.decode.engine.kv_cache_bytes=4MiB",
            "router.disaggregation_threshold=16",
            *PLANNER,
        ],
    )
    harness = ClusterHarness(config, str(tiny_model_dir), scalable=True, controller=True)
    harness.start()
    yield harness
    harness.stop()


@pytest.fixture(scope="module")
def reference(reference_llm: LLM) -> dict[str, list[int]]:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outs = reference_llm.generate([*LONG, *AFTER], params)
    return {p: list(o.token_ids) for p, o in zip([*LONG, *AFTER], outs, strict=True)}


def _replica_actors() -> dict[str, int]:
    """Name -> pid of every live replica actor of the application."""
    prefix = f"SERVE_REPLICA::{APP_NAME}#"
    return {
        info["Name"]: int(info["Pid"])
        for info in ray._private.state.actors().values()
        if info["Name"].startswith(prefix) and info["State"] == "ALIVE"
    }


def _running(pool: str) -> int:
    status = serve.status().applications[APP_NAME].deployments[pool]
    return sum(n for s, n in status.replica_states.items() if str(s).endswith("RUNNING"))


def _scales(cluster: ClusterHarness) -> list[dict[str, object]]:
    assert cluster.registry is not None
    return [d for d in cluster.registry.routing.decisions() if d["kind"] == "scale"]


def _send(cluster: ClusterHarness, prompts: list[str], threads: int) -> dict[str, list[int]]:
    done, errors = generate_concurrently(cluster, prompts, threads, GREEDY)
    assert not errors, errors
    return dict(done)


def _prefill_instances(cluster: ClusterHarness) -> int:
    return sum(1 for pool, _, _ in cluster.instances() if pool == "prefill")


def test_queued_prefills_add_a_prefill_replica_without_a_redeploy(
    cluster: ClusterHarness, reference: dict[str, list[int]]
) -> None:
    wait_until(lambda: _running("controller") == 1, 60.0, "the controller replica")
    before = _replica_actors()
    assert len(before) == 4  # router, prefill, decode, controller
    assert _running("prefill") == 1 and _prefill_instances(cluster) == 1
    assert _scales(cluster) == []

    done = _send(cluster, LONG, 6)
    assert done == {p: reference[p] for p in LONG}
    wait_until(lambda: bool(_scales(cluster)), 60.0, "a scale decision", step_s=0.5)
    (scale,) = _scales(cluster)
    assert (scale["pool"], scale["replicas_from"], scale["replicas_to"]) == ("prefill", 1, 2)
    assert float(str(scale["prefill_pressure"])) >= 0.5

    wait_until(lambda: _running("prefill") == 2, 180.0, "a second prefill replica", step_s=0.5)
    wait_until(lambda: _prefill_instances(cluster) == 2, 60.0, "it registered", step_s=0.5)
    after = _replica_actors()
    assert {name: after.get(name) for name in before} == before  # none restarted
    assert len(after) == 5
    assert _running("decode") == 1 and _running("router") == 1

    assert _send(cluster, AFTER, 2) == {p: reference[p] for p in AFTER}
    assert _scales(cluster) == [scale]  # the cooldown holds


def test_a_killed_controller_is_replaced_and_the_new_one_takes_the_lease(
    cluster: ClusterHarness,
) -> None:
    assert cluster.registry is not None
    lease = cluster.registry.keys.controller
    redis = cluster.redis_client
    holder = redis.get(lease)
    assert holder is not None
    prefix = f"SERVE_REPLICA::{APP_NAME}#controller#"
    (name,) = [n for n in _replica_actors() if n.startswith(prefix)]
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    # Serve replaces the replica (once its health check finds it dead); the new one
    # acts once the dead one's lease expired.
    wait_until(
        lambda: [n for n in _replica_actors() if n.startswith(prefix) and n != name] != [],
        120.0,
        "a new controller replica",
        step_s=0.5,
    )
    handle = serve.get_deployment_handle("controller", app_name=APP_NAME)

    def leads() -> bool:
        try:
            return bool(handle.leading.remote().result(timeout_s=10))
        except Exception:  # still routed to the dead replica, or the new one starting
            return False

    wait_until(leads, 90.0, "the new controller holds the lease", step_s=0.5)
    assert redis.get(lease) not in (None, holder)
    assert cluster.registry.routing.read().threshold == 16  # reset as configured
    assert _running("prefill") == 2  # the pool keeps the count the first one set
