"""The prefill pool's Ray Serve deployment.

Lifecycle of a replica:

    __init__     build the engine with a kv_transfer `SendHook` on its forward pass and a
                 `KVSender` over the configured transport; start the engine thread
                 (`worker.engine_loop`) and register in the registry. With
                 tp x pp > 1 this replica is rank 0, and every other rank (a Ray actor
                 in the replica's placement group) has its own hook and sender for its
                 own KV slices (`prefill_worker.rank_role`)
    prefill()    one prompt, sent by the router at the same time as the decode request:
                   register the transfer with every rank's hook, then on rank 0 queue
                   the prompt with
                   max_tokens=1 (one engine command, so no step runs in between); a
                   migrated stream's prompt comes with its tokens so far, which are
                   computed and sent with it, and the token after them is sampled
                   the engine batches it with other prompts under its token budget and
                   chunked prefill; as each layer finishes, the hook queues that
                   layer's newly complete blocks to the sender, which pushes them into
                   the decode replica's blocks while the next layer computes
                   the hook pins every block it queues (`BlockPins`), since the sender
                   may send them straight from the cache after the engine is done with
                   them. Each sender's first message to a decode rank waits (bounded)
                   until that rank registered the transfer (the decode replica
                   reserves its blocks meanwhile; a refusal fails it at once). The
                   chunk that completes the prompt samples the first token; rank 0's
                   hook then finishes the transfer with it, and END carries it (and
                   its logprobs and sampler draws) to the decode replica, which
                   continues from it; the engine frees the request (full prompt
                   blocks stay as prefix cache)
                   wait (bounded) for every rank's sender to report DONE; return
                   success and timings, or why it failed (for the router's metrics)
                 If the caller goes away first, the transfer and the request are
                 aborted and the blocks freed. Either way, the pins are released in the
                 background once no rank's sender reads the blocks any more (at once
                 after DONE; after a failure, once the sends in flight are over, within
                 their transport's operation timeout). The other ranks' hooks
                 pin nothing: rank 0's pins hold the same block ids in every rank's
                 cache.
    abort()      the same abort, by request id. The router sends both calls at once,
                 so an abort may come first: its id is remembered for a while and the
                 prefill, when it comes, is refused at once (rather than waiting for
                 a registration the decode replica, aborted too, never writes)
                 (the prefill-and-push itself is `prefill_worker.pusher.Pusher`, which
                 switchable replicas share)
    state(), suspend_heartbeat(), resume_heartbeat(), check_health()
                 as every pool's replica answers them (`worker.replica.PoolReplica`);
                 state() adds the transfers still active on the other ranks
    __del__      deregister, stop the engine thread, close the sender

Spans (under the router's `prefill.call`): `prefill` for the whole call, the engine's
`prefill.queue`, `prefill.chunk` and `prefill.layer` (`worker.layer_spans`), and
`prefill.wait_sent`, from the first token to every rank's sender reporting DONE.
"""

from __future__ import annotations

import logging

from prefill_worker.pusher import Pusher, release_when_unread
from prefill_worker.rank_role import PrefillRankRole
from registry import Role
from worker.engine_loop import COMMAND_TIMEOUT_S
from worker.messages import (
    PrefillOutcome,
    PrefillRequest,
    WorkerSettings,
    WorkerState,
)
from worker.replica import PoolReplica
from worker.runtime import WorkerRuntime, replica_unique_id

logger = logging.getLogger(__name__)

__all__ = ["PrefillWorker", "release_when_unread"]


class PrefillWorker(PoolReplica):
    def __init__(self, settings: WorkerSettings) -> None:
        if settings.role is not Role.PREFILL:
            raise ValueError("PrefillWorker serves prefill pools")
        hooks = Pusher.hooks(settings)
        self._rt = WorkerRuntime(
            settings,
            replica_unique_id(),
            layer_hook=hooks.spans,
            output_hook=hooks.send.on_outputs,
            tick=hooks.spans.mark_step,
            rank_role=PrefillRankRole,
        )
        self._pusher = Pusher(self._rt, hooks)
        self._rt.start()

    # -- the deployment's methods -----------------------------------------------------------

    async def prefill(self, request: PrefillRequest, replica: str | None = None) -> PrefillOutcome:
        self._rt.check_pin(replica)
        return await self._pusher.prefill(request)

    def _abort(self, request_id: str) -> None:
        self._pusher.discard(request_id)
        self._rt.engine.abort_request(request_id)

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        self._pusher.note_abort(request_id)
        await self._rt.loop.call(lambda: self._abort(request_id), COMMAND_TIMEOUT_S)

    def _state(self) -> WorkerState:
        return self._worker_state(
            active_transfers=self._pusher.sender.num_active,
            pending_remote_prefills=self._pusher.num_requests,
            remote_prefill_fallbacks=0,
            transfer_failures=0,
        )

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        rt.stop()
        self._pusher.close()
