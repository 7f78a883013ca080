"""The deployment of a switchable pool: each replica serves both roles.

A cluster with the controller enabled (`planner.enabled`) deploys its prefill and its
decode pool with this class. Each replica registers under its pool's role, marked
`switchable`, and the controller may flip it to the other role in the routing table
(`registry.routing`); the router then sends it the other role's calls, through its own
pool's deployment handle. Nothing is redeployed and nothing restarts: the replica
already holds both halves, built once over one engine.

Lifecycle of a replica:

    __init__     the engine, with the prefill half's layer hook (`Pusher`: streams a
                 registered prompt's KV as layers finish; other requests pass through)
                 and, for the shm transport, its KV cache in shared memory for the
                 decode half (`Generator`: lands remote KV); then both halves, the
                 engine thread and the registry presence. With tp x pp > 1 every other
                 rank holds both halves' rank roles too (`dual_worker.rank_role`)
    prefill()    as a prefill instance: prefill the prompt and push its KV and first
                 token to the decode instance the router chose (`Pusher.prefill`)
    generate()   as a decode instance: wait for the remote KV, or prefill a short
                 prompt here, and stream tokens (`Generator.generate`)
    prefill_failed()
                 as a decode instance: the request's remote prefill failed; recompute it
                 (both as the decode pool's replicas: `decode_worker.replica`)
    abort()      a request of either kind: its outgoing transfer, its incoming
                 transfer, then the engine request
    state(), suspend_heartbeat(), resume_heartbeat(), check_health()
                 as every pool's replica answers them (`worker.replica.PoolReplica`);
                 state() adds the transfers still active on the other ranks
    __del__      deregister, abort what is pending, stop the thread, close both halves

A flip changes only which new requests arrive: requests already running here (decodes
after a flip to prefill, prompts after a flip to decode) finish on this engine.
"""

from __future__ import annotations

import dataclasses
import logging

from decode_worker.generator import Generator
from decode_worker.replica import DecodingReplica
from dual_worker.rank_role import DualRankRole
from prefill_worker.pusher import Pusher
from registry import Role
from worker.engine_loop import COMMAND_TIMEOUT_S
from worker.messages import (
    PrefillOutcome,
    PrefillRequest,
    WorkerSettings,
    WorkerState,
)
from worker.runtime import WorkerRuntime, replica_unique_id

logger = logging.getLogger(__name__)


class DualWorker(DecodingReplica):
    def __init__(self, settings: WorkerSettings) -> None:
        if settings.role not in (Role.PREFILL, Role.DECODE):
            raise ValueError("DualWorker serves prefill and decode pools, not colocated ones")
        if not settings.switchable:
            settings = dataclasses.replace(settings, switchable=True)
        hooks = Pusher.hooks(settings)
        storage = Generator.kv_storage(settings, takes_remote=True)
        self._rt = WorkerRuntime(
            settings,
            replica_unique_id(),
            layer_hook=hooks.spans,
            output_hook=hooks.send.on_outputs,
            tick=hooks.spans.mark_step,
            kv_storage=storage,
            rank_role=DualRankRole,
        )
        self._pusher = Pusher(self._rt, hooks)
        self._gen = Generator(self._rt, storage, takes_remote=True)
        self._rt.start()

    # -- the deployment's methods -------------------------------------------------------

    async def prefill(self, request: PrefillRequest, replica: str | None = None) -> PrefillOutcome:
        self._rt.check_pin(replica)
        return await self._pusher.prefill(request)

    def _abort(self, request_id: str) -> None:
        self._pusher.discard(request_id)
        self._gen.abort(request_id)

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        self._pusher.note_abort(request_id)
        await self._rt.loop.call(lambda: self._abort(request_id), COMMAND_TIMEOUT_S)

    def _state(self) -> WorkerState:
        remote = self._gen.remote
        assert remote is not None
        return self._worker_state(
            active_transfers=remote.num_active + self._pusher.sender.num_active,
            pending_remote_prefills=remote.num_pending + self._pusher.num_requests,
            remote_prefill_fallbacks=self._rt.engine.num_remote_prefill_fallbacks,
            transfer_failures=remote.transfer_failures,
            extra={
                **self._gen.shm_slots(),
                "prefills_pushed": self._pusher.pushed,
                "remote_prefills_landed": remote.landed,
            },
        )

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        rt.presence.stop()
        self._gen.close()
        rt.stop()
        self._pusher.close()
        self._gen.close_receiver()
