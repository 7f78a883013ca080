"""The other ranks of a TP/PP replica: Ray actors in the replica's placement group.

A pool with tp x pp > 1 gives each replica one placement-group bundle per rank
(the builder sets Serve's `placement_group_bundles`). The Serve replica is rank 0, in
bundle 0: it runs the engine (scheduler, block pool, sampling) and drives every step.
Ranks 1..N-1 are `RankActor`s that `RemoteRanks` places in bundles 1..N-1.

Lifecycle:

    RemoteRanks(...)      rank 0 starts a TCPStore, creates the actors (each builds its
                          pool's `RankRole` (worker/rank_role.py), joins the instance's
                          groups over the store, loads its model shard, allocates its KV
                          cache and starts its role on it), and joins the groups itself;
                          that join returns once every rank is in (bounded)
    steps                 rank 0's engine broadcasts each step; every actor runs its share
                          on its own thread (`engine.parallel.worker.RankWorker.serve`),
                          with its role's layer hook when it has one
    metrics               each actor records its own transfers, labelled with the
                          pool, the replica and its rank (worker.pool_metrics)
    transfers             every rank moves its own KV slices (kv_transfer's M:N plan);
                          rank 0 reaches each rank's role with `call("role_call", ...)`
                          and combines their `poll`s (`combine`). The prefill and decode
                          roles live in their pools' packages
    close()               after rank 0's engine broadcast STOP: each actor's thread ends,
                          its role closes, and the actors are killed

Every call to an actor is bounded by a timeout; an actor that died fails the transfers
it took part in, never the caller's thread.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from engine.parallel.comm import RankGroups, StoreAddress, serve_store
from engine.parallel.layout import ParallelLayout
from engine.parallel.worker import RankWorker
from kv_transfer.base import PENDING, TRANSFERRING, TransferState, TransferStatus, failed
from kv_transfer.mapping import KVGeometry
from kv_transfer.rendezvous import RedisRendezvous
from registry import connect
from registry.traces import start_tracing
from telemetry import install_log_records, tracing
from worker.kv_rank import local_rank, transfer_host
from worker.messages import WorkerSettings
from worker.pool_metrics import TransferMetrics, pool_metrics
from worker.rank_role import RankContext, RankRole

logger = logging.getLogger(__name__)

CALL_TIMEOUT_S = 30.0  # one round of calls to every actor
ENDED_WAIT_S = 0.5  # longest wait of one `take_ended` long-poll


class RankActor:
    """Rank `rank` (>= 1) of one replica: its engine shard plus its pool's `RankRole`.
    Wrapped with `ray.remote` by `RemoteRanks`; the methods are its remote calls."""

    def __init__(
        self,
        settings: WorkerSettings,
        instance_id: str,
        rank: int,
        store: StoreAddress,
        role_cls: type[RankRole] | None,
    ) -> None:
        host = transfer_host(settings.transfer_host)  # this actor's node, for "auto"
        self._role = role_cls(settings) if role_cls is not None else None
        self._worker = RankWorker(
            settings.engine,
            rank,
            store,
            settings.rank_timeout_s,
            kv_storage=self._role.kv_storage() if self._role is not None else None,
            host=host,
            setup_timeout_s=max(settings.rank_start_timeout_s, settings.rank_timeout_s),
        )
        replica = instance_id.removeprefix(f"{settings.pool}-")
        self.metrics = pool_metrics(settings.pool, replica, rank, settings.role.value)
        self._redis = connect(settings.redis_url, client_name=f"{instance_id}-rank{rank}")
        install_log_records()
        start_tracing(settings.tracing, self._redis, settings.cluster, f"{instance_id}-rank{rank}")
        if self._role is not None:
            mc = self._worker.model_config
            ctx = RankContext(
                settings,
                local_rank(settings, instance_id, rank),
                self._worker.kv,
                KVGeometry(mc.num_layers, mc.num_kv_heads),
                RedisRendezvous(self._redis, settings.cluster),
                host,
                self._worker.layer_offset,
                TransferMetrics(self.metrics).record,
            )
            self._role.start(ctx)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._serve, name=f"rank-{rank}", daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        hooked = self._role.step_hook() if self._role is not None else None
        try:
            if hooked is None:
                self._worker.serve()
            else:
                self._worker.serve(*hooked)
        except BaseException as e:  # a dead peer: the collective failed
            logger.exception("rank %d stopped with an error", self._worker.layout.rank)
            self._error = e

    def ready(self) -> bool:
        return self._thread.is_alive()

    def role_call(self, method: str, *args: Any) -> Any:
        """Call the role's public method `method` (the pool's own remote calls)."""
        if self._role is None or method.startswith("_") or method in _GENERIC:
            raise AttributeError(f"rank role has no remote call {method!r}")
        return getattr(self._role, method)(*args)

    def poll(self, transfer_ids: list[str]) -> list[TransferStatus]:
        if self._error is not None or not self._thread.is_alive():
            return [failed(f"rank {self._worker.layout.rank} stopped") for _ in transfer_ids]
        if self._role is None:
            raise RuntimeError("this rank moves no KV")
        return self._role.poll(transfer_ids)

    def take_ended(self, timeout_s: float) -> dict[str, TransferStatus]:
        """The transfers that ended on this rank since the last call, once one has or
        after `timeout_s`; raises once the rank's step thread has stopped."""
        if self._role is None:
            raise RuntimeError("this rank moves no KV")
        self._check_running()
        ended = self._role.take_ended(timeout_s)
        self._check_running()
        return ended

    def _check_running(self) -> None:
        if self._error is not None or not self._thread.is_alive():
            raise RuntimeError(f"rank {self._worker.layout.rank} stopped")

    def num_active(self) -> int:
        return self._role.num_active() if self._role is not None else 0

    def close(self, timeout_s: float = 10.0) -> None:
        """After rank 0 broadcast STOP: end the step thread and close the role."""
        self._thread.join(timeout_s)
        if self._role is not None:
            self._role.close()
        tracing.shutdown()
        self._redis.close()


# The role's methods that the actor calls itself, never by name from the pool.
_GENERIC = frozenset(
    {"kv_storage", "start", "step_hook", "poll", "num_active", "take_ended", "close"}
)


class RemoteRanks:
    """Rank 0's handle on ranks 1..N-1 of its replica."""

    def __init__(
        self,
        settings: WorkerSettings,
        instance_id: str,
        host: str,
        resources: dict[str, float],
        role_cls: type[RankRole] | None = None,
    ) -> None:
        engine_config = settings.engine
        setup_s = max(settings.rank_start_timeout_s, settings.rank_timeout_s)
        self._store, address = serve_store(setup_s, host)
        self.actors: list[Any] = []
        self._spawn(settings, instance_id, address, resources, role_cls)
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

    def _spawn(
        self,
        settings: WorkerSettings,
        instance_id: str,
        address: StoreAddress,
        resources: dict[str, float],
        role_cls: type[RankRole] | None,
    ) -> None:
        """Create the actors of ranks 1..N-1, rank r in bundle r of this replica's
        placement group; they join the groups over the store at `address`."""
        import ray
        from ray.util.placement_group import get_current_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

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
        for rank in range(1, settings.engine.tp * settings.engine.pp):
            if pg is not None:
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                    placement_group=pg, placement_group_bundle_index=rank
                )
            self.actors.append(
                actor_cls.options(name=None, **options).remote(
                    settings, instance_id, rank, address, role_cls
                )
            )

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

    def watch_ended(
        self,
        stop: threading.Event,
        on_ended: Callable[[int, dict[str, TransferStatus]], None],
        on_lost: Callable[[int, Exception], None],
        wait_s: float = ENDED_WAIT_S,
    ) -> None:
        """Until `stop`: hand `on_ended(rank, ended)` the transfers each rank's role
        reports ended, as soon as it does. One long-poll (`take_ended`, bounded by
        `wait_s`) is out per rank; a rank whose call fails or is not answered within
        `wait_s + CALL_TIMEOUT_S` is reported (`on_lost`) and asked again after `wait_s`."""
        import ray

        calls: dict[Any, tuple[int, float]] = {}  # ref -> (actor index, issued at)
        retry_at: dict[int, float] = {}

        def ask(i: int) -> None:
            calls[self.actors[i].take_ended.remote(wait_s)] = (i, time.monotonic())

        for i in range(len(self.actors)):
            ask(i)
        while not stop.is_set():
            ready: list[Any] = []
            if calls:
                ready, _ = ray.wait(list(calls), num_returns=1, timeout=wait_s)
            else:
                stop.wait(wait_s)
            now = time.monotonic()
            for ref in ready:
                i, _ = calls.pop(ref)
                try:
                    ended = ray.get(ref, timeout=CALL_TIMEOUT_S)
                except Exception as e:
                    on_lost(i + 1, e)
                    retry_at[i] = now + wait_s
                    continue
                if ended:
                    on_ended(i + 1, ended)
                ask(i)
            for ref, (i, issued) in list(calls.items()):
                if now - issued > wait_s + CALL_TIMEOUT_S:
                    del calls[ref]
                    on_lost(i + 1, TimeoutError(f"no answer in {now - issued:.0f}s"))
                    retry_at[i] = now + wait_s
            for i, at in list(retry_at.items()):
                if now >= at:
                    del retry_at[i]
                    ask(i)

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
