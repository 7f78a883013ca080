"""Does the Ray cluster have what the config asks for? Checked before anything deploys.

Serve waits forever for a replica whose resources no node has (it logs a warning and
the application stays DEPLOYING), so `pdserve up` checks the config against the
cluster's nodes first and fails with the pool and the missing resource named.

A replica asks for one bundle of `resources_per_rank` per rank. The check is the one
Ray's scheduler would make with the cluster as it is now:
- every resource a rank names exists on some node, and one node can hold a whole rank;
- a STRICT_PACK replica's ranks fit together on one node;
- a STRICT_SPREAD replica has a node for each rank;
- the router and every replica together fit in the cluster's totals.
An autoscaling cluster may add nodes later, so for a cluster `up` did not start itself
the launcher reports these findings as warnings instead of errors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from cluster.config import ClusterConfig, PoolConfig

NodeResources = Mapping[str, float]

_EPS = 1e-9


def _fits(need: Mapping[str, float], have: NodeResources) -> bool:
    return all(have.get(k, 0.0) + _EPS >= v for k, v in need.items() if v > 0)


def _times(need: Mapping[str, float], n: int) -> dict[str, float]:
    return {k: v * n for k, v in need.items()}


def _fmt(res: Mapping[str, float]) -> str:
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(res.items()) if v > 0) + "}"


def _pool_problems(pool: PoolConfig, nodes: Sequence[NodeResources]) -> list[str]:
    where = f"pools.{pool.name}"
    rank = pool.resources_per_rank
    problems = []
    for key, amount in rank.items():
        if amount > 0 and not any(n.get(key, 0.0) > 0 for n in nodes):
            problems.append(
                f"{where}.resources_per_rank: asks for {key}: {amount:g} per rank, "
                f"but no node of the Ray cluster has {key}"
            )
    if problems:
        return problems
    if not any(_fits(rank, n) for n in nodes):
        return [
            f"{where}.resources_per_rank: no node can hold one rank's {_fmt(rank)} "
            f"(largest node: {_fmt(max(nodes, key=lambda n: sum(n.values())))})"
        ]
    world = pool.world_size
    if world > 1 and pool.placement_strategy == "STRICT_PACK":
        whole = _times(rank, world)
        if not any(_fits(whole, n) for n in nodes):
            problems.append(
                f"{where}.placement_strategy: STRICT_PACK puts a replica's {world} ranks "
                f"({_fmt(whole)}) on one node, and no node has that much"
            )
    if world > 1 and pool.placement_strategy == "STRICT_SPREAD":
        hosts = sum(1 for n in nodes if _fits(rank, n))
        if hosts < world:
            problems.append(
                f"{where}.placement_strategy: STRICT_SPREAD needs {world} nodes that each "
                f"hold a rank's {_fmt(rank)}, and the cluster has {hosts}"
            )
    return problems


def resource_problems(config: ClusterConfig, nodes: Sequence[NodeResources]) -> list[str]:
    """What the cluster, described by its alive nodes' resources, cannot give `config`.

    An empty list means every replica can be placed. Side-effect free.
    """
    if not nodes:
        return ["the Ray cluster has no alive nodes"]
    problems: list[str] = []
    for pool in config.pools:
        problems += _pool_problems(pool, nodes)
    if problems:
        return problems
    demand: dict[str, float] = {"CPU": config.router.num_cpus * config.router.replicas}
    for pool in config.pools:
        for key, amount in pool.resources_per_rank.items():
            demand[key] = demand.get(key, 0.0) + amount * pool.world_size * pool.replicas
    total: dict[str, float] = {}
    for n in nodes:
        for key, amount in n.items():
            total[key] = total.get(key, 0.0) + amount
    for key, amount in sorted(demand.items()):
        if amount > 0 and total.get(key, 0.0) + _EPS < amount:
            problems.append(
                f"pools: the router and the pools' replicas ask for {key}: {amount:g} in all, "
                f"and the Ray cluster has {total.get(key, 0.0):g} (lower replicas, tp/pp or "
                f"resources_per_rank, or add nodes)"
            )
    return problems


def alive_node_resources() -> list[dict[str, float]]:
    """The total resources of each alive node of the connected Ray cluster."""
    import ray

    return [
        {k: float(v) for k, v in node.get("Resources", {}).items()}
        for node in ray.nodes()  # type: ignore[no-untyped-call]
        if node.get("Alive")
    ]
