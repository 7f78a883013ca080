"""A switchable replica's ranks 1..N-1: both pools' rank roles over one engine shard.

A switchable replica (`dual_worker.deployment`) may be flipped between prefill and
decode at any time, and requests of the old role finish while the new role's arrive;
so each of its other ranks holds a prefill role (sender and step hook) and a decode
role (receiver, and the shm storage its KV cache lives in) at once. `DualRankRole`
composes the two for `worker.ranks.RankActor`, which builds it like any pool's role:

    __init__(settings)  both halves (`PrefillRankRole`, `DecodeRankRole`)
    kv_storage()        the decode half's: remote KV lands straight in the cache
    start(ctx)          the prefill half (its sender), then the decode half (its receiver)
    step_hook()         the prefill half's: a registered prompt's KV streams out as
                        layers finish; other requests pass through it untouched
    remote calls        each name belongs to one half: `add_transfer`, `abort_send`,
                        `reading` to the prefill half (rank 0's `Pusher`); `expect`,
                        `refuse`, `abort_recv` to the decode half (rank 0's `RemoteKV`)
    poll                the sending side's transfers: rank 0 polls only its sends, and
                        learns of its receives from `take_ended`
    take_ended          the decode half's long-poll
    num_active          transfers in flight on both sides
    close()             both halves, the prefill half first
"""

from __future__ import annotations

from decode_worker.rank_role import DecodeRankRole
from engine.forward_hooks import LayerHook
from engine.llm_engine import KVStorage
from engine.parallel.worker import TagResolver
from kv_transfer.base import RecvSpec, SendSpec, TransferStatus
from prefill_worker.rank_role import PrefillRankRole
from worker.messages import WorkerSettings
from worker.rank_role import RankContext, RankRole


class DualRankRole(RankRole):
    """Rank `>= 1` of a switchable replica: a sender and a receiver on one shard."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._send = PrefillRankRole(settings)
        self._recv = DecodeRankRole(settings)

    def kv_storage(self) -> KVStorage | None:
        return self._recv.kv_storage()

    def start(self, ctx: RankContext) -> None:
        self._send.start(ctx)
        self._recv.start(ctx)

    def step_hook(self) -> tuple[LayerHook, TagResolver] | None:
        return self._send.step_hook()

    # -- the prefill half's remote calls ---------------------------------------------------

    def add_transfer(self, request_id: str, spec: SendSpec) -> None:
        self._send.add_transfer(request_id, spec)

    def abort_send(self, request_id: str, transfer_id: str, reason: str) -> None:
        self._send.abort_send(request_id, transfer_id, reason)

    def reading(self, transfer_id: str) -> bool:
        return self._send.reading(transfer_id)

    # -- the decode half's remote calls ----------------------------------------------------

    def expect(self, spec: RecvSpec) -> None:
        self._recv.expect(spec)

    def refuse(self, transfer_id: str, reason: str) -> None:
        self._recv.refuse(transfer_id, reason)

    def abort_recv(self, transfer_id: str, reason: str) -> None:
        self._recv.abort_recv(transfer_id, reason)

    # -- generic -------------------------------------------------------------------------

    def poll(self, transfer_ids: list[str]) -> list[TransferStatus]:
        return self._send.poll(transfer_ids)

    def take_ended(self, timeout_s: float) -> dict[str, TransferStatus]:
        return self._recv.take_ended(timeout_s)

    def num_active(self) -> int:
        return self._send.num_active() + self._recv.num_active()

    def close(self) -> None:
        try:
            self._send.close()
        finally:
            self._recv.close()
