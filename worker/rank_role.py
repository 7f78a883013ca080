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
    close()                 after the step thread ended
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from engine.forward_hooks import LayerHook
from engine.kv_cache import KVCache
from engine.llm_engine import KVStorage
from engine.parallel.worker import TagResolver
from kv_transfer.base import LocalRank, TransferStatus
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

    @abstractmethod
    def close(self) -> None: ...
