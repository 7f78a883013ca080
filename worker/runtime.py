"""What every pool's replica is made of: an engine on its own thread, a registry
presence, and the instance's identity. The decode and prefill deployments compose one.

Identity: Serve names each replica with a unique id. The instance id in the registry
and in kv_transfer is `<pool>-<replica unique id>`, and the registry entry's `address`
is the replica unique id, which the router passes to `router.pinning` to reach exactly
this replica.

Metrics: `metrics` (worker.pool_metrics) is this rank 0's set, labelled with the pool,
the replica unique id and rank 0; the engine loop records into it, and the role's
kv_transfer sender or receiver reports each transfer to `transfer_metrics`.

Lifecycle: `WorkerRuntime(settings, ...)` builds the engine (its torch threads pinned
to the pool's CPU share) and the loop; with tp x pp > 1 it first starts the replica's
other ranks (`worker.ranks.RemoteRanks`, each with the pool's `rank_role`) and runs
the engine as rank 0.
`start()` starts the engine thread, then registers; `stop()` deregisters first (the
router stops sending here), then stops the engine thread and the other ranks, and
flushes this process's spans. Tracing and the request-id log context are set up first,
so every line the replica logs on a request's behalf names the request.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from engine import LLMEngine
from engine.forward_hooks import LayerHook
from engine.llm_engine import KVStorage, OutputHook
from kv_transfer.mapping import KVGeometry
from kv_transfer.rendezvous import RedisRendezvous
from registry import InstanceInfo, Registry, connect
from registry.traces import start_tracing
from telemetry import install_log_records, tracing
from worker.engine_loop import EngineLoop
from worker.errors import InstanceUnavailable
from worker.kv_rank import transfer_host
from worker.messages import WorkerSettings
from worker.pool_metrics import EngineMetrics, TransferMetrics, pool_metrics
from worker.presence import Presence
from worker.rank_role import RankRole
from worker.ranks import RemoteRanks

logger = logging.getLogger(__name__)


__all__ = ["WorkerRuntime", "replica_unique_id", "transfer_host"]


def replica_unique_id() -> str:
    """This Serve replica's unique id (only inside a replica)."""
    from ray import serve

    return str(serve.get_replica_context().replica_id.unique_id)


class WorkerRuntime:
    def __init__(
        self,
        settings: WorkerSettings,
        replica_id: str,
        *,
        layer_hook: LayerHook | None = None,
        kv_storage: KVStorage | None = None,
        output_hook: OutputHook | None = None,
        tick: Callable[[], None] | None = None,
        busy: Callable[[], bool] | None = None,
        rank_role: type[RankRole] | None = None,
    ) -> None:
        self.settings = settings
        self.replica_id = replica_id
        self.instance_id = f"{settings.pool}-{replica_id}"
        install_log_records()
        self.metrics = pool_metrics(settings.pool, replica_id, 0, settings.role.value)
        self.transfer_metrics = TransferMetrics(self.metrics)
        self.redis = connect(settings.redis_url, client_name=self.instance_id)
        start_tracing(settings.tracing, self.redis, settings.cluster, self.instance_id)
        self.registry = Registry(self.redis, settings.cluster, lease_ttl_s=settings.lease_ttl_s)
        self.presence = self._presence()
        self.ranks = self._start_ranks(rank_role)
        try:
            self.engine = LLMEngine(
                settings.engine,
                layer_hook=layer_hook,
                kv_storage=kv_storage,
                cache_listener=self.presence.on_cache_event,
                groups=self.ranks.groups if self.ranks is not None else None,
                output_hook=output_hook,
            )
        except BaseException:
            if self.ranks is not None:
                self.ranks.kill()
            raise
        mc = self.engine.model_config
        self.geometry = KVGeometry(mc.num_layers, mc.num_kv_heads)
        self.loop = EngineLoop(
            self.engine,
            name=self.instance_id,
            tick=tick,
            busy=busy,
            metrics=EngineMetrics(self.metrics),
        )

    def _start_ranks(self, rank_role: type[RankRole] | None) -> RemoteRanks | None:
        """With tp x pp > 1, ranks 1..N-1, each with the pool's `rank_role`."""
        settings = self.settings
        if settings.engine.tp * settings.engine.pp == 1:
            return None
        return RemoteRanks(
            settings,
            self.instance_id,
            transfer_host(settings.transfer_host),
            settings.rank_resources,
            rank_role,
        )

    def _presence(self) -> Presence:
        """This instance's registry entry and heartbeat (started by `start`)."""
        settings = self.settings
        info = InstanceInfo(
            instance_id=self.instance_id,
            pool=settings.pool,
            role=settings.role.routing_role,
            address=self.replica_id,
            tp=settings.engine.tp,
            pp=settings.engine.pp,
            block_size=settings.engine.block_size,
            switchable=settings.switchable,
        )
        return Presence(
            self.registry,
            info,
            lambda: self.loop.load_report(),
            interval_s=settings.load_report_interval_s,
        )

    def rendezvous(self) -> RedisRendezvous:
        """The kv_transfer rendezvous store in this cluster's namespace."""
        return RedisRendezvous(self.redis, self.settings.cluster)

    def start(self) -> None:
        self.loop.start()
        self.presence.start()
        logger.info("%s ready (%s)", self.instance_id, self.settings.role.value)

    def stop(self) -> None:
        self.presence.stop()
        self.loop.stop()
        if self.ranks is not None:
            if not self.loop.running:
                self.engine.shutdown()  # STOP to the other ranks
            self.ranks.close()
        tracing.shutdown()
        self.redis.close()

    def check_pin(self, replica: str | None) -> None:
        """A pinned call must have reached the replica it named."""
        if replica is not None and replica != self.replica_id:
            raise InstanceUnavailable(f"call pinned to replica {replica} reached {self.replica_id}")
