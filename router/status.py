"""The cluster as one router replica sees it, for ClusterStatus: each pool's live
instances with their latest load reports and how old those are."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from registry import LoadReport, Role
from router.cluster_view import ClusterView
from router.settings import PoolSpec


@dataclass(frozen=True)
class InstanceStatus:
    instance_id: str
    pool: str
    role: Role
    load: LoadReport | None
    age_s: float  # age of the load report


@dataclass(frozen=True)
class PoolStatus:
    spec: PoolSpec
    instances: tuple[InstanceStatus, ...]


def pool_status(view: ClusterView, pools: Sequence[PoolSpec]) -> list[PoolStatus]:
    now = time.time()
    views = view.instances()
    out = []
    for spec in pools:
        instances = tuple(
            InstanceStatus(
                v.info.instance_id,
                spec.name,
                spec.role,
                v.load,
                max(0.0, now - v.load.ts) if v.load is not None else 0.0,
            )
            for v in views
            if v.info.pool == spec.name
        )
        out.append(PoolStatus(spec, instances))
    return out
