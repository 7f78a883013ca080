"""The decode pool's Ray Serve deployment (also the colocated pool's).

Lifecycle of a replica:

    __init__        build the engine (KV cache in shared memory for the shm transport),
                    a KV receiver when the pool takes remote prefills, the engine thread
                    and the registry presence; start them. With tp x pp > 1 this
                    replica is rank 0 and every other rank (a Ray actor in the
                    replica's placement group) receives its own KV slices; a transfer
                    is DONE once every rank's receiver is
    generate()      one request, streamed:
                      local prompt   -> the engine prefills it, then decodes
                      remote prompt  -> the router started the prefill at the same time;
                                        the scheduler holds blocks for the prompt and
                                        the receiver registers the transfer
                                        (`decode_worker.remote_kv`). On DONE the
                                        sequence joins the running batch with the first
                                        token from the transfer's header; on FAILED or
                                        timeout it is recomputed here (counted). Without
                                        room it is refused and prefilled here (counted)
                    then TokenChunks until the finished one. A stream that moved here
                    from a failed instance carries its tokens so far (engine.resume):
                    they are computed with the prompt, here or by the remote prefill,
                    and the chunks start after them. If the caller goes away
                    (client cancel, router abort) the request is aborted: the transfer
                    first, then the engine request, so its blocks return to the pool.
    abort()         the same abort, by request id (the router's explicit cleanup)
    prefill_failed()
                    the router saw the request's remote prefill fail (the call raised,
                    the instance died, or its transfer failed): the KV will not come, so
                    the prompt is recomputed here at once (counted), not at the
                    transfer's timeout
                    (the request path itself is `decode_worker.generator.Generator`,
                    and these two calls `decode_worker.replica.DecodingReplica`'s,
                    which switchable replicas share)
    check_health()  Serve's periodic probe: raises once the engine thread failed, or once
                    an idle keepalive found a TP/PP replica's other ranks unreachable
                    (with state() and the heartbeat drills, as every pool's replica
                    answers them: `worker.replica.PoolReplica`)
    stop (Serve)    a scale-down or redeploy: Serve stops routing here at once and waits
                    up to the pool's graceful_shutdown_timeout_s for the open streams;
                    the router moves those still open at half of it (router.drain)
    __del__         (close) deregister, abort what is pending, stop the thread, close
                    the receiver and the shared-memory segment

Spans (under the router's `dispatch`): `decode` for the whole call; `decode.first_token`
from the call to the first chunk with tokens, then `decode.stream` to the last one;
for a remote prefill, `decode.wait_kv` and `decode.join` (`decode_worker.remote_kv`).

Every wait is bounded: engine commands by `COMMAND_TIMEOUT_S`, the gap between two
outputs of a request by the stream timeout (longer than the transfer timeout, since a
remote prefill either lands or falls back within it).
"""

from __future__ import annotations

import logging

from decode_worker.generator import Generator
from decode_worker.rank_role import DecodeRankRole
from decode_worker.replica import DecodingReplica
from registry import Role
from worker.engine_loop import COMMAND_TIMEOUT_S
from worker.messages import (
    WorkerSettings,
    WorkerState,
)
from worker.runtime import WorkerRuntime, replica_unique_id

logger = logging.getLogger(__name__)


class DecodeWorker(DecodingReplica):
    def __init__(self, settings: WorkerSettings, replica_id: str | None = None) -> None:
        """`replica_id` is Serve's unique id of this replica, which Serve supplies when
        None; an in-process replica outside Serve names itself."""
        self._closed = False
        if settings.role is Role.PREFILL:
            raise ValueError("DecodeWorker serves decode and colocated pools")
        takes_remote = settings.role is Role.DECODE
        storage = Generator.kv_storage(settings, takes_remote)
        self._rt = WorkerRuntime(
            settings,
            replica_id or replica_unique_id(),
            kv_storage=storage,
            rank_role=DecodeRankRole if takes_remote else None,
        )
        self._gen = Generator(self._rt, storage, takes_remote)
        self._rt.start()

    # -- the deployment's methods -------------------------------------------------------

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        await self._rt.loop.call(lambda: self._gen.abort(request_id), COMMAND_TIMEOUT_S)

    def _state(self) -> WorkerState:
        remote = self._gen.remote
        return self._worker_state(
            active_transfers=remote.num_active if remote is not None else 0,
            pending_remote_prefills=remote.num_pending if remote is not None else 0,
            remote_prefill_fallbacks=self._rt.engine.num_remote_prefill_fallbacks,
            transfer_failures=remote.transfer_failures if remote is not None else 0,
            extra=self._gen.shm_slots(),
        )

    def __del__(self) -> None:
        self.close()

    def close(self) -> None:
        """Deregister and release everything (idempotent; Serve gets here by `__del__`)."""
        rt = getattr(self, "_rt", None)
        if rt is None or getattr(self, "_closed", False):
            return
        self._closed = True
        rt.presence.stop()
        self._gen.close()
        rt.stop()
        self._gen.close_receiver()
