"""A decode rank's kv_transfer side: its endpoint, and on ranks 1..N-1 its role.

Every rank of a decode replica receives its own KV slices (kv_transfer's M:N plan)
through an `Endpoint` (shm needs the rank's KV cache in a shared-memory segment:
`ShmKVStorage`). On ranks 1..N-1, `DecodeRankRole` holds the rank's `KVReceiver`;
rank 0's `RemoteKV` (decode_worker/remote_kv.py) reaches it:

    expect       the transfer's blocks on this rank are reserved and registered
    take_ended   a long-poll: the transfers this rank's receiver ended since the
                 last call (its `on_end`), as soon as one has; rank 0 settles a
                 transfer once every rank's receiver ended it
    poll         one transfer's state on this rank
    refuse       tell the transfer's sender this rank will not take it
    abort_recv   fail the transfer on this rank
"""

from __future__ import annotations

from engine.llm_engine import KVStorage
from kv_transfer.base import RecvSpec, TransferStatus
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import RendezvousStore
from kv_transfer.shm import ShmConfig, ShmEndpoint, ShmKVStorage, ShmSegment
from kv_transfer.torch_dist import TorchDistConfig, TorchDistEndpoint
from kv_transfer.transport import Endpoint, TransportKind
from worker.kv_rank import transfer_secret
from worker.messages import WorkerSettings
from worker.rank_role import Endings, RankContext, RankRole


def receiver_endpoint(
    settings: WorkerSettings,
    store: RendezvousStore,
    host: str,
    segment: ShmSegment | None,
    geometry: KVGeometry,
) -> Endpoint:
    secret = transfer_secret(settings)
    if settings.transport is TransportKind.SHM:
        if segment is None:
            raise ValueError("the shm transport needs the KV cache in a shared-memory segment")
        return ShmEndpoint(store, segment, geometry, ShmConfig(secret=secret))
    return TorchDistEndpoint(store, TorchDistConfig(host=host, secret=secret))


class DecodeRankRole(RankRole):
    """Rank `>= 1` of a decode replica: a receiver into the rank's KV cache."""

    def __init__(self, settings: WorkerSettings) -> None:
        shm = settings.transport is TransportKind.SHM
        self._storage = ShmKVStorage() if shm else None
        self._receiver: KVReceiver | None = None
        self._endings = Endings()

    def kv_storage(self) -> KVStorage | None:
        return self._storage

    def start(self, ctx: RankContext) -> None:
        segment = self._storage.segment if self._storage is not None else None
        endpoint = receiver_endpoint(ctx.settings, ctx.rendezvous, ctx.host, segment, ctx.geometry)
        self._receiver = KVReceiver(
            ctx.me,
            ctx.kv,
            ctx.geometry,
            endpoint,
            registry=ctx.rendezvous,
            on_end=self._endings.add,
            on_record=ctx.record,
        )

    def _started(self) -> KVReceiver:
        if self._receiver is None:
            raise RuntimeError("the decode rank role is not started")
        return self._receiver

    def expect(self, spec: RecvSpec) -> None:
        self._started().expect(spec)

    def abort_recv(self, transfer_id: str, reason: str) -> None:
        self._started().abort(transfer_id, reason)

    def refuse(self, transfer_id: str, reason: str) -> None:
        self._started().refuse(transfer_id, reason)

    def poll(self, transfer_ids: list[str]) -> list[TransferStatus]:
        receiver = self._started()
        return [receiver.poll(t) for t in transfer_ids]

    def take_ended(self, timeout_s: float) -> dict[str, TransferStatus]:
        self._started()
        return self._endings.take(timeout_s)

    def num_active(self) -> int:
        return self._receiver.num_active if self._receiver is not None else 0

    def close(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
        if self._storage is not None and self._storage.segment is not None:
            self._storage.segment.close()
