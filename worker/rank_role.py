"""What a pool adds to ranks 1..N-1 of its TP/PP replicas: a `RankRole`.

`worker.ranks.RankActor` runs a rank's engine shard for any pool; the pool's role
object holds that rank's kv_transfer side (a sender, a receiver, or nothing for a
colocated pool) and answers the role's remote calls. Lifecycle on one rank:

    role_cls(settings)      built in the actor, before the engine shard
    kv_storage()            where the shard's KV cache lives (None: ordinary memory)
    start(ctx)              once the shard has its KV cache: build the sender/receiver
    step_hook()             the layer hook the step thread calls, with its tag resolver
    remote calls            `RemoteRanks.call("role_call", name, ...)` reaches the role's
                            public method `name`; `poll` and `num_active` are generic
    take_ended(timeout_s)   a long-poll: the transfers that ended here since the last
                            call, as soon as one has (`Endings`), so that rank 0 learns
                            completion from the rank's own transport, not by polling
    close()                 after the step thread ended
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from dataclasses import dataclass

from engine.forward_hooks import LayerHook
from engine.kv_cache import KVCache
from engine.llm_engine import KVStorage
from engine.parallel.worker import TagResolver
from kv_transfer.base import LocalRank, RecordSink, TransferStatus
from kv_transfer.mapping import KVGeometry
from kv_transfer.rendezvous import RendezvousStore
from worker.messages import WorkerSettings


@dataclass(frozen=True)
class RankContext:
    """One rank's engine shard and kv_transfer identity, as its role starts."""

    settings: WorkerSettings
    me: LocalRank
    kv: KVCache
    geometry: KVGeometry
    rendezvous: RendezvousStore
    host: str  # the address this rank's transport binds
    layer_offset: int  # global index of the rank's first layer
    record: RecordSink  # where its sender or receiver reports each transfer's figures


class Endings:
    """Transfers that ended on one rank, kept until rank 0 takes them: added from any
    thread (a transport's completion), taken by one long-poll at a time."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._ended: dict[str, TransferStatus] = {}

    def add(self, transfer_id: str, status: TransferStatus) -> None:
        with self._cond:
            self._ended[transfer_id] = status
            self._cond.notify_all()

    def take(self, timeout_s: float) -> dict[str, TransferStatus]:
        """What ended since the last take, once something has or after `timeout_s`."""
        with self._cond:
            self._cond.wait_for(lambda: bool(self._ended), timeout_s)
            taken, self._ended = self._ended, {}
        return taken


class RankRole(ABC):
    """The kv_transfer side of one rank (>= 1) of a replica."""

    @abstractmethod
    def __init__(self, settings: WorkerSettings) -> None: ...

    def kv_storage(self) -> KVStorage | None:
        return None

    @abstractmethod
    def start(self, ctx: RankContext) -> None: ...

    def step_hook(self) -> tuple[LayerHook, TagResolver] | None:
        return None

    @abstractmethod
    def poll(self, transfer_ids: list[str]) -> list[TransferStatus]: ...

    @abstractmethod
    def num_active(self) -> int: ...

    def take_ended(self, timeout_s: float) -> dict[str, TransferStatus]:
        """The transfers that ended on this rank since the last call (a long-poll,
        bounded by `timeout_s`); a role whose completion rank 0 polls has none."""
        raise NotImplementedError(f"{type(self).__name__} reports no endings")

    @abstractmethod
    def close(self) -> None: ...
