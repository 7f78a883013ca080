"""The check of a config against the Ray cluster's nodes: each problem names the pool
and the resource, and a config the nodes can place passes."""

from __future__ import annotations

import pytest

from cluster.config_file import load_config
from cluster.resources import resource_problems

LAPTOP = [{"CPU": 8.0, "memory": 16e9}]


def test_default_config_fits_a_laptop() -> None:
    assert resource_problems(load_config(), LAPTOP) == []


def test_a_resource_no_node_has() -> None:
    c = load_config(None, ["pools.decode.resources_per_rank={GPU: 1, CPU: 1}"])
    (problem,) = resource_problems(c, LAPTOP)
    assert problem.startswith("pools.decode.resources_per_rank: asks for GPU: 1 per rank")
    assert "no node of the Ray cluster has GPU" in problem


def test_a_rank_larger_than_every_node() -> None:
    c = load_config(None, ["pools.prefill.resources_per_rank={CPU: 16}"])
    (problem,) = resource_problems(c, [{"CPU": 8.0}, {"CPU": 4.0}])
    assert "pools.prefill.resources_per_rank: no node can hold one rank's {CPU: 16}" in problem


def test_strict_pack_needs_one_node_for_the_whole_replica() -> None:
    gpus = [{"CPU": 32.0, "GPU": 2.0}, {"CPU": 32.0, "GPU": 2.0}]
    c = load_config(
        None,
        [
            "pools.decode.tp=4",
            "pools.decode.resources_per_rank={GPU: 1, CPU: 1}",
            "pools.prefill.resources_per_rank={GPU: 1, CPU: 1}",
        ],
    )
    (problem,) = resource_problems(c, gpus)
    assert "pools.decode.placement_strategy: STRICT_PACK puts a replica's 4 ranks" in problem
    assert "{CPU: 4, GPU: 4}" in problem
    # PACK may split the ranks over both nodes; then only the totals count (5 GPUs > 4)
    packed = load_config(
        None,
        [
            "pools.decode.tp=4",
            "pools.decode.placement_strategy=PACK",
            "pools.decode.resources_per_rank={GPU: 1, CPU: 1}",
            "pools.prefill.resources_per_rank={GPU: 1, CPU: 1}",
        ],
    )
    (total,) = resource_problems(packed, gpus)
    assert total.startswith("pools: the router and the pools' replicas ask for GPU: 5 in all")
    assert "has 4" in total
    assert resource_problems(packed, [*gpus, {"CPU": 8.0, "GPU": 1.0}]) == []


def test_strict_spread_needs_a_node_per_rank() -> None:
    c = load_config(None, ["pools.decode.pp=3", "pools.decode.placement_strategy=STRICT_SPREAD"])
    (problem,) = resource_problems(c, [{"CPU": 8.0}, {"CPU": 8.0}])
    assert "STRICT_SPREAD needs 3 nodes" in problem and "the cluster has 2" in problem
    assert resource_problems(c, [{"CPU": 8.0}] * 3) == []


@pytest.mark.parametrize("cpus", [2.0, 2.5])
def test_totals_count_the_router_and_every_replica(cpus: float) -> None:
    c = load_config(None, ["pools.decode.replicas=2"])  # router 1 + prefill 1 + decode 2
    (problem,) = resource_problems(c, [{"CPU": cpus}])
    assert f"ask for CPU: 4 in all, and the Ray cluster has {cpus:g}" in problem


def test_no_alive_nodes() -> None:
    assert resource_problems(load_config(), []) == ["the Ray cluster has no alive nodes"]
