"""The decode role's half of a replica: take a request, wait for its remote KV or
prefill it here, and stream its tokens. The decode (and colocated) pool's replicas run
one (`decode_worker.deployment`), and so does every switchable replica
(`dual_worker`), whichever role it holds.

Lifecycle: `storage = Generator.kv_storage(settings, takes_remote)` goes into the
engine (`WorkerRuntime`'s `kv_storage`: the shm transport lands KV straight in a
shared-memory cache); then `Generator(runtime, storage, takes_remote)` builds the KV
receiver when it takes remote prefills. `generate()` is one request (the steps are in
`decode_worker.deployment`'s docstring); `abort` (engine thread) aborts a request with
its transfer; `prefill_failed` (engine thread) recomputes a prompt whose remote prefill
the router saw fail, without waiting for its transfer's timeout; `close_pending`
(engine thread) and `close()` end it all.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator

from decode_worker.chunks import ChunkBuilder
from decode_worker.rank_role import receiver_endpoint
from decode_worker.remote_kv import RemoteKV
from kv_transfer.receiver import KVReceiver
from kv_transfer.shm import ShmEndpoint, ShmKVStorage
from kv_transfer.transport import TransportKind
from telemetry import TraceContext, tracing
from telemetry.context import REQUEST_ID
from worker.engine_loop import COMMAND_TIMEOUT_S
from worker.errors import RequestAborted
from worker.kv_rank import local_rank, transfer_host
from worker.messages import TokenChunk, WorkerRequest, WorkerSettings
from worker.runtime import WorkerRuntime

logger = logging.getLogger(__name__)


class Generator:
    @staticmethod
    def kv_storage(settings: WorkerSettings, takes_remote: bool) -> ShmKVStorage | None:
        """The engine's KV storage, before the engine exists: shared memory when the
        shm transport lands remote KV here."""
        if takes_remote and settings.transport is TransportKind.SHM:
            return ShmKVStorage()
        return None

    def __init__(self, rt: WorkerRuntime, storage: ShmKVStorage | None, takes_remote: bool):
        self._rt = rt
        self._storage = storage
        self._stream_timeout_s = max(60.0, rt.settings.transfer_timeout_s + 15.0)
        self.remote: RemoteKV | None = self._remote_kv() if takes_remote else None

    def _remote_kv(self) -> RemoteKV:
        rt = self._rt
        settings = rt.settings
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
            if self.remote is None:
                logger.warning("request %s: this pool prefills locally", req.request_id)
            elif not self.remote.start(req, trace):
                return
        self._rt.engine.add_request(
            req.request_id, list(req.prompt_token_ids), req.params, req.resume
        )

    def abort(self, request_id: str) -> None:
        """Engine thread: the request's transfer first, then the request, then its
        stream (if its reader is still there it ends with RequestAborted)."""
        if self.remote is not None:
            self.remote.abort(request_id)
        else:
            self._rt.engine.abort_request(request_id)
        self._rt.loop.end_stream(request_id, RequestAborted(f"request {request_id} aborted"))

    def prefill_failed(self, request_id: str, reason: str) -> None:
        """Engine thread: the router saw the request's remote prefill fail."""
        if self.remote is not None:
            self.remote.prefill_failed(request_id, reason)

    def shm_slots(self) -> dict[str, int]:
        endpoint = self.remote.receiver.endpoint if self.remote is not None else None
        if isinstance(endpoint, ShmEndpoint):
            return {"shm_free_slots": endpoint.num_free_slots, "shm_slots": endpoint.num_slots}
        return {}

    # -- one request --------------------------------------------------------------------

    async def generate(self, request: WorkerRequest) -> AsyncGenerator[TokenChunk, None]:
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
            await loop.call(lambda: self._start(request, trace), COMMAND_TIMEOUT_S)
            builder = ChunkBuilder(len(request.prompt_token_ids))
            first = True
            while not finished:
                outs = await stream.get(self._stream_timeout_s)
                info = self.remote.info(rid) if self.remote is not None else None
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
            if self.remote is not None:
                self.remote.forget(rid)
            if not finished:
                loop.submit(lambda: self.abort(rid))

    def close(self) -> None:
        """Abort what is pending (through the engine thread), then close the receiver
        and the shared-memory segment."""
        rt = self._rt
        remote = self.remote
        if remote is not None and rt.loop.running:
            try:
                rt.loop.submit(remote.close).result(timeout=COMMAND_TIMEOUT_S)
            except Exception:
                logger.exception("aborting pending transfers of %s", rt.instance_id)

    def close_receiver(self) -> None:
        """After the engine thread stopped."""
        if self.remote is not None:
            self.remote.receiver.close()
        if self._storage is not None and self._storage.segment is not None:
            self._storage.segment.close()
