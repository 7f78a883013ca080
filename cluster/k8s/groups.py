"""Plan the Ray node groups of a RayService from the cluster config.

One plan per group, in a fixed order: the head, the routers, then one worker group per
pool. A pool's pods are sized from its Ray layout:

* a replica's ranks share one node under STRICT_PACK/PACK, so a pod holds one
  replica's `tp * pp` ranks; under SPREAD/STRICT_SPREAD a pod holds one rank;
* a pod's GPUs are its ranks times the GPUs per rank (whole GPUs only), its Ray CPUs
  the ranks times the CPUs per rank, and its container gets `extra_cpus` more for
  the raylet, the Serve proxy and the dashboard agent;
* each pool's pods advertise a Ray resource of their own, `pdserve_pool_<name>`, one
  unit per rank, and each rank asks for one unit (`cluster.k8s.serve_config`), so a
  pool's replicas only ever land on its own group (prefill on compute nodes, decode on
  memory nodes) and never take half of another pool's pod.

The head runs no replicas (`num-cpus: 0`): only the GCS, the dashboard and the Serve
controller. Anything the renderer cannot express raises `RenderError` naming the field.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from cluster.config import ClusterConfig, ConfigError, PoolConfig
from cluster.k8s.settings import DNS_LABEL, GroupSettings

GIB = 1 << 30
_MIB = 1 << 20
_MIN_OBJECT_STORE = 80 * _MIB  # Ray refuses less than 75 MiB
_RESERVED_GROUPS = ("head", "router")
_PACKED = ("STRICT_PACK", "PACK")

GroupKind = Literal["head", "router", "pool"]


class RenderError(ConfigError):
    """The config asks for something the Kubernetes renderer cannot express."""


def pool_resource(pool_name: str) -> str:
    """The Ray resource that pins a pool's ranks to its own worker group."""
    return f"pdserve_pool_{pool_name}"


@dataclass(frozen=True)
class GroupPlan:
    name: str  # the worker group's name; "head" for the head
    kind: GroupKind
    pods: int
    ray_cpus: int  # rayStartParams num-cpus
    gpus: int  # the container's GPUs and rayStartParams num-gpus
    container_cpus: float  # request = limit
    memory_bytes: int  # request = limit, /dev/shm included
    shm_bytes: int
    image: str
    settings: GroupSettings
    ray_resources: dict[str, float] = field(default_factory=dict)
    pool: PoolConfig | None = None

    @property
    def object_store_bytes(self) -> int:
        return self.shm_bytes // 2


def _settings(config: ClusterConfig, kind: GroupKind, pool: str | None) -> GroupSettings:
    k = config.kubernetes
    if kind == "head":
        return k.head
    if kind == "router":
        return k.router
    assert pool is not None
    return k.pools.get(pool) or GroupSettings.model_validate({})


def _plan(
    config: ClusterConfig,
    *,
    name: str,
    kind: GroupKind,
    pods: int,
    ray_cpus: int,
    gpus: int,
    default_memory: int,
    where: str,
    ray_resources: dict[str, float] | None = None,
    pool: PoolConfig | None = None,
) -> GroupPlan:
    s = _settings(config, kind, pool.name if pool else None)
    shm = int(s.shm_size) if s.shm_size is not None else GIB + 2 * GIB * gpus
    if shm // 2 < _MIN_OBJECT_STORE:
        raise RenderError(
            f"{where}.shm_size: {shm} bytes leaves Ray's object store (half of /dev/shm) "
            f"below {_MIN_OBJECT_STORE} bytes"
        )
    memory = int(s.memory) if s.memory is not None else default_memory
    k = config.kubernetes
    return GroupPlan(
        name=name,
        kind=kind,
        pods=pods,
        ray_cpus=ray_cpus,
        gpus=gpus,
        container_cpus=ray_cpus + s.extra_cpus,
        memory_bytes=memory + shm,
        shm_bytes=shm,
        image=s.image or (k.gpu_image if gpus > 0 else k.image),
        settings=s,
        ray_resources=ray_resources or {},
        pool=pool,
    )


def _whole(value: float) -> bool:
    return abs(value - round(value)) < 1e-9


def _pool_plan(config: ClusterConfig, pool: PoolConfig) -> GroupPlan:
    where = f"pools.{pool.name}"
    if not _matches_dns_label(pool.name) or pool.name in _RESERVED_GROUPS:
        raise RenderError(
            f"{where}.name: a pool's worker group is named after it, so it must be a "
            f"lowercase DNS label other than {' or '.join(_RESERVED_GROUPS)}"
        )
    custom = sorted(set(pool.resources_per_rank) - {"CPU", "GPU"})
    if custom:
        raise RenderError(
            f"{where}.resources_per_rank: Ray resources {custom} have no Kubernetes "
            f"counterpart here; ask for CPU/GPU and pick nodes with "
            f"kubernetes.pools.{pool.name}.node_selector"
        )
    ranks_per_pod = pool.world_size if pool.placement_strategy in _PACKED else 1
    pods = pool.replicas * pool.world_size // ranks_per_pod
    gpu_per_rank = pool.resources_per_rank.get("GPU", 0.0)
    gpus = ranks_per_pod * gpu_per_rank
    if not _whole(gpus):
        raise RenderError(
            f"{where}.resources_per_rank.GPU: a pod holds {ranks_per_pod} rank(s) of "
            f"{gpu_per_rank} GPU, {gpus:g} GPUs in all; Kubernetes gives pods whole GPUs"
        )
    cpus = ranks_per_pod * pool.resources_per_rank.get("CPU", 0.0)
    return _plan(
        config,
        name=pool.name,
        kind="pool",
        pods=pods,
        ray_cpus=math.ceil(cpus - 1e-9),
        gpus=round(gpus),
        default_memory=4 * GIB * ranks_per_pod,
        where=f"kubernetes.pools.{pool.name}",
        ray_resources={pool_resource(pool.name): float(ranks_per_pod)},
        pool=pool,
    )


def _matches_dns_label(name: str) -> bool:
    return re.fullmatch(DNS_LABEL, name) is not None


def plan_groups(config: ClusterConfig) -> list[GroupPlan]:
    """The head, the router group, then one group per pool in config order."""
    unknown = sorted(set(config.kubernetes.pools) - {p.name for p in config.pools})
    if unknown:
        raise RenderError(f"kubernetes.pools: no pool named {unknown} in pools")
    head = _plan(
        config,
        name="head",
        kind="head",
        pods=1,
        ray_cpus=0,
        gpus=0,
        default_memory=4 * GIB,
        where="kubernetes.head",
    )
    r = config.router
    router = _plan(
        config,
        name="router",
        kind="router",
        pods=r.replicas,
        ray_cpus=max(1, math.ceil(r.num_cpus - 1e-9)),
        gpus=0,
        default_memory=2 * GIB,
        where="kubernetes.router",
    )
    return [head, router, *(_pool_plan(config, p) for p in config.pools)]
