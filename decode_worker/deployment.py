"""The decode pool's Ray Serve deployment (also the colocated pool's).

Lifecycle of a replica:

    __init__        build the engine (KV cache in shared memory for the shm transport),
                    a KV receiver when the pool takes remote prefills, the engine thread
                    and the registry presence; start them. With tp x pp > 1 this
                    replica is rank 0 and every other rank (a Ray actor in the
                    replica's placement group) receives its own KV slices; a transfer
                    is DONE once every rank's receiver is (`worker.ranks`)
    generate()      one request, streamed:
                      local prompt   -> the engine prefills it, then decodes
                      remote prompt  -> reserve blocks and expect the transfer, yield
                                        Reserved; the router then starts the prefill and
                                        relays its outcome via complete_remote_prefill();
                                        on DONE the sequence joins the running batch,
                                        on FAILED it is recomputed here (counted)
                    then TokenChunks until the finished one. If the caller goes away
                    (client cancel, router abort) the request is aborted: the transfer
                    first, then the engine request, so its blocks return to the pool.
    abort()         the same abort, by request id (the router's explicit cleanup)
    check_health()  Serve's periodic probe: raises once the engine thread failed, or once
                    an idle keepalive found a TP/PP replica's other ranks unreachable
    __del__         deregister, abort what is pending, stop the thread, close the
                    receiver and the shared-memory segment

Every wait is bounded: engine commands by `_COMMAND_TIMEOUT_S`, the gap between two
outputs of a request by the stream timeout (longer than the transfer timeout, since a
remote prefill either lands or falls back within it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from decode_worker.chunks import ChunkBuilder
from decode_worker.ranked_receiver import RankedReceiver
from decode_worker.remote_prefill import RemotePrefills
from kv_transfer.base import TransferReceiver
from kv_transfer.receiver import KVReceiver
from kv_transfer.shm import ShmEndpoint, ShmKVStorage
from kv_transfer.transport import TransportKind
from registry import Role
from worker.kv_roles import local_rank, receiver_endpoint, transfer_host
from worker.messages import (
    PrefillOutcome,
    Reserved,
    WorkerEvent,
    WorkerRequest,
    WorkerSettings,
    WorkerState,
)
from worker.runtime import WorkerRuntime, replica_unique_id

logger = logging.getLogger(__name__)

_COMMAND_TIMEOUT_S = 30.0


class DecodeWorker:
    def __init__(self, settings: WorkerSettings) -> None:
        if settings.role is Role.PREFILL:
            raise ValueError("DecodeWorker serves decode and colocated pools")
        self._storage = ShmKVStorage() if settings.transport is TransportKind.SHM else None
        takes_remote = settings.role is Role.DECODE
        self._rt = WorkerRuntime(
            settings,
            replica_unique_id(),
            kv_storage=self._storage if takes_remote else None,
            tick=self._tick,
            busy=self._busy,
        )
        self._stream_timeout_s = max(60.0, settings.transfer_timeout_s + 15.0)
        self._receiver: KVReceiver | RankedReceiver | None = None
        self._remote: RemotePrefills | None = None
        if takes_remote:
            segment = self._storage.segment if self._storage is not None else None
            endpoint = receiver_endpoint(
                settings,
                self._rt.rendezvous(),
                transfer_host(settings.transfer_host),
                segment,
                self._rt.geometry,
            )
            local = KVReceiver(
                local_rank(settings, self._rt.instance_id, 0),
                self._rt.engine.kv_cache,
                self._rt.geometry,
                endpoint,
            )
            ranks = self._rt.ranks
            self._receiver = local if ranks is None else RankedReceiver(local, ranks)
            receiver: TransferReceiver = self._receiver
            self._remote = RemotePrefills(self._rt.engine, receiver, self._rt.loop.post)
        self._rt.start()

    # -- engine thread hooks ------------------------------------------------------------

    def _tick(self) -> None:
        if self._remote is not None:
            self._remote.poll()

    def _busy(self) -> bool:
        return self._remote is not None and self._remote.num_pending > 0

    def _start(self, req: WorkerRequest) -> str:
        """Engine thread: queue the request; returns why a remote prefill was refused."""
        engine = self._rt.engine
        reason = ""
        if req.remote is not None:
            if self._remote is None:
                reason = "this pool does not take remote prefills"
            else:
                reason = self._remote.start(req)
                if not reason:
                    return ""
        engine.add_request(req.request_id, list(req.prompt_token_ids), req.params)
        return reason

    def _abort(self, request_id: str) -> None:
        if self._remote is not None:
            self._remote.abort(request_id)
        else:
            self._rt.engine.abort_request(request_id)

    # -- the deployment's methods -------------------------------------------------------

    async def generate(
        self, request: WorkerRequest, replica: str | None = None
    ) -> AsyncIterator[WorkerEvent]:
        self._rt.check_pin(replica)
        rid = request.request_id
        loop = self._rt.loop
        stream = loop.open_stream(rid)
        finished = False
        try:
            reason = await loop.call(lambda: self._start(request), _COMMAND_TIMEOUT_S)
            if request.remote is not None:
                yield Reserved(remote=not reason, reason=reason)
            builder = ChunkBuilder(len(request.prompt_token_ids))
            while not finished:
                outs = await stream.get(self._stream_timeout_s)
                info = self._remote.info(rid) if self._remote is not None else None
                chunk = builder.build(outs, info)
                finished = chunk.finished
                yield chunk
        finally:
            loop.close_stream(rid)
            if self._remote is not None:
                self._remote.forget(rid)
            if not finished:
                loop.submit(lambda: self._abort(rid))

    async def complete_remote_prefill(
        self, request_id: str, outcome: PrefillOutcome, replica: str | None = None
    ) -> None:
        self._rt.check_pin(replica)
        remote = self._remote
        if remote is None:
            return
        await self._rt.loop.call(lambda: remote.deliver(request_id, outcome), _COMMAND_TIMEOUT_S)

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        await self._rt.loop.call(lambda: self._abort(request_id), _COMMAND_TIMEOUT_S)

    async def state(self, replica: str | None = None) -> WorkerState:
        self._rt.check_pin(replica)
        return await self._rt.loop.call(self._state, _COMMAND_TIMEOUT_S)

    def _state(self) -> WorkerState:
        engine = self._rt.engine
        extra: dict[str, int] = {}
        receiver = self._receiver
        if receiver is not None and isinstance(receiver.endpoint, ShmEndpoint):
            extra["shm_free_slots"] = receiver.endpoint.num_free_slots
            extra["shm_slots"] = receiver.endpoint.num_slots
        return WorkerState(
            instance_id=self._rt.instance_id,
            pool=self._rt.settings.pool,
            role=self._rt.settings.role,
            num_requests=engine.num_requests,
            num_streams=self._rt.loop.num_streams,
            free_blocks=engine.block_pool.num_free,
            total_blocks=engine.block_pool.num_blocks,
            active_transfers=receiver.num_active if receiver is not None else 0,
            pending_remote_prefills=self._remote.num_pending if self._remote else 0,
            remote_prefill_fallbacks=engine.num_remote_prefill_fallbacks,
            transfer_failures=self._remote.transfer_failures if self._remote else 0,
            heartbeat_running=self._rt.presence.heartbeat_running,
            extra=extra,
        )

    async def suspend_heartbeat(self, replica: str | None = None) -> None:
        """Stop renewing the lease without deregistering (for fault drills)."""
        self._rt.check_pin(replica)
        self._rt.presence.suspend()

    async def resume_heartbeat(self, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        self._rt.presence.resume()

    def check_health(self) -> None:
        self._rt.loop.check()

    def __del__(self) -> None:
        rt = getattr(self, "_rt", None)
        if rt is None:
            return
        rt.presence.stop()
        remote = self._remote
        if remote is not None and rt.loop.running:
            try:
                rt.loop.submit(remote.close).result(timeout=_COMMAND_TIMEOUT_S)
            except Exception:
                logger.exception("aborting pending transfers of %s", rt.instance_id)
        rt.stop()
        if self._receiver is not None:
            self._receiver.close()
        if self._storage is not None and self._storage.segment is not None:
            self._storage.segment.close()
