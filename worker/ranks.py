"""The other ranks of a TP/PP replica: Ray actors in the replica's placement group.

A pool with tp x pp > 1 gives each replica one placement-group bundle per rank
(the builder sets Serve's `placement_group_bundles`). The Serve replica is rank 0, in
bundle 0: it runs the engine (scheduler, block pool, sampling) and drives every step.
Ranks 1..N-1 are `RankActor`s that `RemoteRanks` places in bundles 1..N-1.

Lifecycle:

    RemoteRanks(...)      rank 0 starts a TCPStore, creates the actors (each joins the
                          instance's groups over it, loads its model shard, allocates its
                          KV cache and builds its kv_transfer role), and joins the groups
                          itself; that join returns once every rank is in (bounded)
    steps                 rank 0's engine broadcasts each step; every actor runs its share
                          on its own thread (`engine.parallel.worker.RankWorker.serve`)
    metrics               each actor records its own transfers, labelled with the
                          pool, the replica and its rank (worker.pool_metrics)
    transfers             every rank moves its own KV slices (kv_transfer's M:N plan):
                            prefill  rank 0 registers the request on every rank's
                                     SendHook (`add_transfer`) before the engine sees it;
                                     the transfer is sent once every rank reports DONE;
                                     rank 0's block pins cover every rank's sources,
                                     until no rank's sender reads them
                            decode   rank 0's `RemoteKV` (decode_worker/remote_kv.py)
                                     expects the transfer on every rank; it is DONE
                                     once every rank's receiver is
    close()               after rank 0's engine broadcast STOP: each actor's thread ends,
                          its role objects close, and the actors are killed

Every call to an actor is bounded by a timeout; an actor that died fails the transfers
it took part in, never the caller's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Sequence
from typing import Any

import torch

from engine.forward_hooks import ScheduledChunk
from engine.parallel.comm import RankGroups, StoreAddress, serve_store
from engine.parallel.layout import ParallelLayout
from engine.parallel.worker import RankWorker
from engine.step_inputs import request_tag
from kv_transfer.base import (
    PENDING,
    TRANSFERRING,
    RecvSpec,
    SendSpec,
    TransferState,
    TransferStatus,
    failed,
)
from kv_transfer.engine_hook import SendHook
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import RedisRendezvous
from kv_transfer.sender import KVSender
from kv_transfer.shm import ShmKVStorage
from kv_transfer.transport import TransportKind
from registry import Role, connect
from registry.traces import start_tracing
from telemetry import install_log_records, request_scope, tracing
from worker.kv_roles import (
    local_rank,
    receiver_endpoint,
    sender_connector,
    transfer_host,
)
from worker.messages import WorkerSettings
from worker.pool_metrics import TransferMetrics, pool_metrics

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # one round of calls to every actor


class _HeldByRankZero:
    """The source pins of ranks 1..N-1. Rank 0's engine hands out every rank's block
    ids, and its own pins keep a transfer's ids from being handed out again until no
    rank's sender reads them (`RankActor.reading`); so `finish` need not wait here
    either, and there is nothing to hold."""

    def pin(self, key: str, block_ids: Sequence[int]) -> None:
        del key, block_ids


class _LockedHook:
    """A SendHook that Ray's method thread (add, discard) and the rank's step thread
    (the layer callbacks) share, with the request tags the step carries."""

    def __init__(self, hook: SendHook) -> None:
        self._hook = hook
        self._lock = threading.Lock()
        self._tags: dict[int, str] = {}

    def add(self, request_id: str, spec: SendSpec) -> None:
        with self._lock:
            self._hook.add(request_id, spec)
            self._tags[request_tag(request_id)] = request_id

    def discard(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._hook.discard(request_id, reason)
            self._tags.pop(request_tag(request_id), None)

    def resolve(self, tag: int) -> str | None:
        with self._lock:
            return self._tags.get(tag)

    def on_layer_done(self, layer: int, chunks: Sequence[ScheduledChunk]) -> None:
        with self._lock:
            self._hook.on_layer_done(layer, chunks)

    def on_step_done(self, chunks: Sequence[ScheduledChunk]) -> None:
        with self._lock:
            self._hook.on_step_done(chunks)
            for c in chunks:
                if c.completes_prompt:
                    self._tags.pop(request_tag(c.request_id), None)


class RankActor:
    """Rank `rank` (>= 1) of one replica: its engine shard plus its kv_transfer role.
    Wrapped with `ray.remote` by `RemoteRanks`; the methods are its remote calls."""

    def __init__(
        self,
        settings: WorkerSettings,
        instance_id: str,
        rank: int,
        store: StoreAddress,
    ) -> None:
        host = transfer_host(settings.transfer_host)  # this actor's node, for "auto"
        self._storage = (
            ShmKVStorage()
            if settings.transport is TransportKind.SHM and settings.role is Role.DECODE
            else None
        )
        self._worker = RankWorker(
            settings.engine,
            rank,
            store,
            settings.rank_timeout_s,
            kv_storage=self._storage,
            host=host,
            setup_timeout_s=max(settings.rank_start_timeout_s, settings.rank_timeout_s),
        )
        mc = self._worker.model_config
        geometry = KVGeometry(mc.num_layers, mc.num_kv_heads)
        me = local_rank(settings, instance_id, rank)
        replica = instance_id.removeprefix(f"{settings.pool}-")
        self.metrics = pool_metrics(settings.pool, replica, rank, settings.role.value)
        record = TransferMetrics(self.metrics).record
        self._redis = connect(settings.redis_url, client_name=f"{instance_id}-rank{rank}")
        install_log_records()
        start_tracing(settings.tracing, self._redis, settings.cluster, f"{instance_id}-rank{rank}")
        rendezvous = RedisRendezvous(self._redis, settings.cluster)
        self._hook: _LockedHook | None = None
        self._sender: KVSender | None = None
        self._receiver: KVReceiver | None = None
        if settings.role is Role.PREFILL:
            connector = sender_connector(settings, rendezvous, host)
            self._sender = KVSender(
                me, self._worker.kv, geometry, connector, registry=rendezvous, on_record=record
            )
            hook = SendHook(
                settings.engine.block_size,
                self._sender,
                self._worker.layer_offset,
                pins=_HeldByRankZero(),
            )
            self._hook = _LockedHook(hook)
        elif settings.role is Role.DECODE:
            segment = self._storage.segment if self._storage is not None else None
            endpoint = receiver_endpoint(settings, rendezvous, host, segment, geometry)
            self._receiver = KVReceiver(
                me, self._worker.kv, geometry, endpoint, registry=rendezvous, on_record=record
            )
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"rank-{rank}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        hook = self._hook
        try:
            self._worker.serve(hook, hook.resolve if hook is not None else None)
        except BaseException as e:  # a dead peer: the collective failed
            logger.exception("rank %d stopped with an error", self._worker.layout.rank)
            self._error = e

    def ready(self) -> bool:
        return self._thread.is_alive()

    # -- prefill ranks -------------------------------------------------------------------

    def add_transfer(self, request_id: str, spec: SendSpec) -> None:
        assert self._hook is not None, "add_transfer on a rank that does not send"
        with request_scope(request_id):  # the sender keeps it for its log lines
            self._hook.add(request_id, spec)

    def abort_send(self, request_id: str, transfer_id: str, reason: str) -> None:
        if self._hook is not None and self._sender is not None:
            self._hook.discard(request_id, reason)
            self._sender.abort(transfer_id, reason)

    def reading(self, transfer_id: str) -> bool:
        """Whether this rank's sender may still read the transfer's source blocks."""
        return self._sender is not None and self._sender.reading(transfer_id)

    # -- decode ranks --------------------------------------------------------------------

    def expect(self, spec: RecvSpec) -> None:
        assert self._receiver is not None, "expect on a rank that does not receive"
        self._receiver.expect(spec)

    def abort_recv(self, transfer_id: str, reason: str) -> None:
        if self._receiver is not None:
            self._receiver.abort(transfer_id, reason)

    def refuse(self, transfer_id: str, reason: str) -> None:
        if self._receiver is not None:
            self._receiver.refuse(transfer_id, reason)

    # -- both ----------------------------------------------------------------------------

    def poll(self, transfer_ids: list[str]) -> list[TransferStatus]:
        role: Any = self._sender if self._sender is not None else self._receiver
        if self._error is not None or not self._thread.is_alive():
            return [failed(f"rank {self._worker.layout.rank} stopped") for _ in transfer_ids]
        return [role.poll(t) for t in transfer_ids]

    def num_active(self) -> int:
        role: Any = self._sender if self._sender is not None else self._receiver
        return int(role.num_active) if role is not None else 0

    def close(self, timeout_s: float = 10.0) -> None:
        """After rank 0 broadcast STOP: end the step thread and close the role objects."""
        self._thread.join(timeout_s)
        if self._sender is not None:
            self._sender.close()
        if self._receiver is not None:
            self._receiver.close()
        if self._storage is not None and self._storage.segment is not None:
            self._storage.segment.close()
        tracing.shutdown()
        self._redis.close()


class RemoteRanks:
    """Rank 0's handle on ranks 1..N-1 of its replica."""

    def __init__(
        self,
        settings: WorkerSettings,
        instance_id: str,
        host: str,
        resources: dict[str, float],
    ) -> None:
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        engine_config = settings.engine
        world = engine_config.tp * engine_config.pp
        setup_s = max(settings.rank_start_timeout_s, settings.rank_timeout_s)
        self._store, address = serve_store(setup_s, host)
        pg = get_current_placement_group()
        if pg is None:
            logger.warning(
                "%s: no placement group; its ranks go wherever Ray puts them", instance_id
            )
        res = dict(resources)
        options: dict[str, Any] = {
            "num_cpus": res.pop("CPU", 0.0),
            "num_gpus": res.pop("GPU", 0.0),
            "resources": res,
            "max_concurrency": 4,  # polls need not wait behind a slow call
        }
        actor_cls: Any = ray.remote(RankActor)
        self.actors: list[Any] = []
        for rank in range(1, world):
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank
                )
            self.actors.append(
                actor_cls.options(name=None, **options).remote(settings, instance_id, rank, address)
            )
        try:
            self.groups = RankGroups(
                ParallelLayout(engine_config.tp, engine_config.pp, 0),
                self._store,
                torch.device(engine_config.device),
                settings.rank_timeout_s,
                host=host,
                setup_timeout_s=setup_s,
            )
        except BaseException:
            self.kill()
            raise
        self.call("ready")  # surfaces an actor that failed after joining

    # -- calls to every actor --------------------------------------------------------------

    def call(self, method: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        """Call `method` on every actor and wait (bounded) for all the results."""
        import ray

        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return list(ray.get(refs, timeout=timeout_s))

    async def acall(self, method: str, *args: Any, timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        refs = [getattr(a, method).remote(*args) for a in self.actors]
        return list(await asyncio.wait_for(asyncio.gather(*refs), timeout_s))

    def send(self, method: str, *args: Any) -> None:
        """Call `method` on every actor without waiting (best effort)."""
        for a in self.actors:
            getattr(a, method).remote(*args)

    def close(self, timeout_s: float = 15.0) -> None:
        """After the engine's STOP: let the actors wind down, then kill them."""
        try:
            self.call("close", timeout_s=timeout_s)
        except Exception:
            logger.warning("ranks did not close cleanly; killing them", exc_info=True)
        self.kill()

    def kill(self) -> None:
        import ray

        for a in self.actors:
            try:
                ray.kill(a)
            except Exception:
                logger.debug("killing a rank actor", exc_info=True)
        self.actors = []


def combine(statuses: Sequence[TransferStatus]) -> TransferStatus:
    """One transfer's state over all ranks: FAILED if any failed, DONE once all are."""
    for s in statuses:
        if s.state is TransferState.FAILED:
            return s
    if all(s.state is TransferState.DONE for s in statuses):
        return statuses[0]
    if any(s.state is not TransferState.PENDING for s in statuses):
        return TRANSFERRING
    return PENDING
