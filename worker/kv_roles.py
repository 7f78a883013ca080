"""The kv_transfer pieces one rank of a pool's replica uses, built from its settings.

Every rank of a replica, rank 0 in the Serve replica and ranks 1..N-1 in their Ray
actors (`worker.ranks`), builds its transport the same way:
- a prefill rank: a `Connector` (torch_dist or shm, wrapped in the fault injector when
  the config asks for a drill) for its `KVSender`;
- a decode rank: an `Endpoint` for its `KVReceiver` (shm needs the rank's KV cache in
  a shared-memory segment: `ShmKVStorage`).
"""

from __future__ import annotations

import logging

from kv_transfer.base import LocalRank, Parallelism
from kv_transfer.faults import FaultyConnector
from kv_transfer.mapping import KVGeometry
from kv_transfer.rendezvous import RendezvousStore
from kv_transfer.shm import ShmConfig, ShmConnector, ShmEndpoint, ShmSegment
from kv_transfer.torch_dist import TorchDistConfig, TorchDistConnector, TorchDistEndpoint
from kv_transfer.transport import Connector, Endpoint, TransportKind
from worker.messages import WorkerSettings

logger = logging.getLogger(__name__)


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


def _secret(settings: WorkerSettings) -> bytes | None:
    return settings.transfer_secret.encode() if settings.transfer_secret else None


def sender_connector(settings: WorkerSettings, store: RendezvousStore, host: str) -> Connector:
    secret = _secret(settings)
    connector: Connector = (
        ShmConnector(store, ShmConfig(secret=secret))
        if settings.transport is TransportKind.SHM
        else TorchDistConnector(store, TorchDistConfig(host=host, secret=secret))
    )
    if settings.faults:
        logger.warning("%s injects KV-transfer faults %s", settings.pool, settings.faults)
        connector = FaultyConnector(connector, settings.faults)
    return connector


def receiver_endpoint(
    settings: WorkerSettings,
    store: RendezvousStore,
    host: str,
    segment: ShmSegment | None,
    geometry: KVGeometry,
) -> Endpoint:
    if settings.transport is TransportKind.SHM:
        if segment is None:
            raise ValueError("the shm transport needs the KV cache in a shared-memory segment")
        return ShmEndpoint(store, segment, geometry, ShmConfig(secret=_secret(settings)))
    return TorchDistEndpoint(store, TorchDistConfig(host=host, secret=_secret(settings)))
