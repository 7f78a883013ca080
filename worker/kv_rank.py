"""A rank's place in kv_transfer, whatever its pool's role: its `LocalRank` identity, the
address its transport binds, and the cluster secret that seals its control channels.

Every rank of a replica, rank 0 in the Serve replica and ranks 1..N-1 in their Ray
actors (`worker.ranks`), derives these the same way; the pools build their sender or
receiver on them (prefill_worker/rank_role.py, decode_worker/rank_role.py).
"""

from __future__ import annotations

from kv_transfer.base import LocalRank, Parallelism
from worker.messages import WorkerSettings


def transfer_host(configured: str) -> str:
    """The address torch_dist binds and advertises: `configured`, or for "auto" this
    node's IP as Ray reports it (a pod's IP on Kubernetes)."""
    if configured != "auto":
        return configured
    import ray

    return str(ray.util.get_node_ip_address())  # type: ignore[no-untyped-call]


def local_rank(settings: WorkerSettings, instance_id: str, rank: int) -> LocalRank:
    parallel = Parallelism(settings.engine.tp, settings.engine.pp)
    tp_rank, pp_rank = parallel.coords(rank)
    return LocalRank(instance_id, parallel, tp_rank, pp_rank)


def transfer_secret(settings: WorkerSettings) -> bytes | None:
    return settings.transfer_secret.encode() if settings.transfer_secret else None
