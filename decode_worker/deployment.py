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
    check_health()  Serve's periodic probe: raises once the engine thread failed, or once
                    an idle keepalive found a TP/PP replica's other ranks unreachable
    stop (Serve)    a scale-down or redeploy: Serve stops routing here at once and waits
                    up to the pool's graceful_shutdown_timeout_s for the open streams;
                    the router moves those still open at half of it (router.drain)
    __del__         (close) deregister, abort what is pending, stop the thread, close
                    the receiver and the shared-memory segment

Spans (under the router's `dispatch`): `decode` for the whole call; `decode.first_token`
from the call to the first chunk with tokens, then `decode.stream` to the last one;
for a remote prefill, `decode.wait_kv` and `decode.join` (`decode_worker.remote_kv`).

Every wait is bounded: engine commands by `_COMMAND_TIMEOUT_S`, the gap between two
outputs of a request by the stream timeout (longer than the transfer timeout, since a
remote prefill either lands or falls back within it).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from decode_worker.chunks import ChunkBuilder
from decode_worker.remote_kv import RemoteKV
from kv_transfer.receiver import KVReceiver
from kv_transfer.shm import ShmEndpoint, ShmKVStorage
from kv_transfer.transport import TransportKind
from registry import Role
from telemetry import TraceContext, tracing
from telemetry.context import REQUEST_ID
from worker.kv_roles import local_rank, receiver_endpoint, transfer_host
from worker.messages import (
    TokenChunk,
    WorkerRequest,
    WorkerSettings,
    WorkerState,
)
from worker.runtime import WorkerRuntime, replica_unique_id

logger = logging.getLogger(__name__)

_COMMAND_TIMEOUT_S = 30.0


class DecodeWorker:
    def __init__(self, settings: WorkerSettings, replica_id: str | None = None) -> None:
        """`replica_id` is Serve's unique id of this replica, which Serve supplies when
        None; an in-process replica outside Serve names itself."""
        if settings.role is Role.PREFILL:
            raise ValueError("DecodeWorker serves decode and colocated pools")
        self._closed = False
        self._storage = ShmKVStorage() if settings.transport is TransportKind.SHM else None
        takes_remote = settings.role is Role.DECODE
        self._rt = WorkerRuntime(
            settings,
            replica_id or replica_unique_id(),
            kv_storage=self._storage if takes_remote else None,
        )
        self._stream_timeout_s = max(60.0, settings.transfer_timeout_s + 15.0)
        self._remote: RemoteKV | None = None
        if takes_remote:
            self._remote = self._remote_kv(settings)
        self._rt.start()

    def _remote_kv(self, settings: WorkerSettings) -> RemoteKV:
        rt = self._rt
        loop = rt.loop
        remote = RemoteKV(
            rt.engine, loop.submit, loop.post, rt.ranks, rt.transfer_metrics.recomputed
        )
        segment = self._storage.segment if self._storage is not None else None
        rendezvous = rt.rendezvous()
        host = transfer_host(settings.transfer_host)
        endpoint = receiver_endpoint(settings, rendezvous, host, segment, rt.geometry)
        me = local_rank(settings, rt.instance_id, 0)
        receiver = KVReceiver(
            me,
            rt.engine.kv_cache,
            rt.geometry,
            endpoint,
            registry=rendezvous,
            on_end=remote.ended,
            on_record=rt.transfer_metrics.record,
        )
        remote.bind(receiver)
        return remote

    # -- engine thread --------------------------------------------------------------------

    def _start(self, req: WorkerRequest, trace: TraceContext | None) -> None:
        """Queue the request: waiting for its remote KV, or to prefill here."""
        if req.remote is not None:
            if self._remote is None:
                logger.warning("request %s: this pool prefills locally", req.request_id)
            elif not self._remote.start(req, trace):
                return
        self._rt.engine.add_request(
            req.request_id, list(req.prompt_token_ids), req.params, req.resume
        )

    def _abort(self, request_id: str) -> None:
        if self._remote is not None:
            self._remote.abort(request_id)
        else:
            self._rt.engine.abort_request(request_id)

    # -- the deployment's methods -------------------------------------------------------

    async def generate(
        self, request: WorkerRequest, replica: str | None = None
    ) -> AsyncIterator[TokenChunk]:
        self._rt.check_pin(replica)
        rid = request.request_id
        REQUEST_ID.set(rid)  # this call's task: its log lines name the request
        span = tracing.start("decode", request.trace, {"remote": request.remote is not None})
        phase = tracing.start("decode.first_token", span)
        loop = self._rt.loop
        stream = loop.open_stream(rid)
        finished = False
        error = "cancelled"
        try:
            trace = tracing.context_of(span)
            await loop.call(lambda: self._start(request, trace), _COMMAND_TIMEOUT_S)
            builder = ChunkBuilder(len(request.prompt_token_ids))
            first = True
            while not finished:
                outs = await stream.get(self._stream_timeout_s)
                info = self._remote.info(rid) if self._remote is not None else None
                chunk = builder.build(outs, info)
                finished = chunk.finished
                if first and chunk.token_ids:
                    first = False
                    tracing.end(phase)
                    phase = tracing.start("decode.stream", span)
                yield chunk
            error = ""
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            raise
        finally:
            tracing.end(phase, error)
            tracing.end(span, error)
            loop.close_stream(rid)
            if self._remote is not None:
                self._remote.forget(rid)
            if not finished:
                loop.submit(lambda: self._abort(rid))

    async def abort(self, request_id: str, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        await self._rt.loop.call(lambda: self._abort(request_id), _COMMAND_TIMEOUT_S)

    async def state(self, replica: str | None = None) -> WorkerState:
        self._rt.check_pin(replica)
        return await self._rt.loop.call(self._state, _COMMAND_TIMEOUT_S)

    def _state(self) -> WorkerState:
        engine = self._rt.engine
        extra: dict[str, int] = {}
        remote = self._remote
        endpoint = remote.receiver.endpoint if remote is not None else None
        if isinstance(endpoint, ShmEndpoint):
            extra["shm_free_slots"] = endpoint.num_free_slots
            extra["shm_slots"] = endpoint.num_slots
        return WorkerState(
            instance_id=self._rt.instance_id,
            pool=self._rt.settings.pool,
            role=self._rt.settings.role,
            num_requests=engine.num_requests,
            num_streams=self._rt.loop.num_streams,
            free_blocks=engine.block_pool.num_free,
            total_blocks=engine.block_pool.num_blocks,
            active_transfers=remote.num_active if remote is not None else 0,
            pending_remote_prefills=remote.num_pending if remote is not None else 0,
            remote_prefill_fallbacks=engine.num_remote_prefill_fallbacks,
            transfer_failures=remote.transfer_failures if remote is not None else 0,
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
        self.close()

    def close(self) -> None:
        """Deregister and release everything (idempotent; Serve gets here by `__del__`)."""
        rt = getattr(self, "_rt", None)
        if rt is None or getattr(self, "_closed", False):
            return
        self._closed = True
        rt.presence.stop()
        remote = self._remote
        if remote is not None and rt.loop.running:
            try:
                rt.loop.submit(remote.close).result(timeout=_COMMAND_TIMEOUT_S)
            except Exception:
                logger.exception("aborting pending transfers of %s", rt.instance_id)
        rt.stop()
        if remote is not None:
            remote.receiver.close()
        if self._storage is not None and self._storage.segment is not None:
            self._storage.segment.close()
