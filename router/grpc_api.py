"""The gRPC front end: pdserve.v1.PDServe and grpc.health.v1.Health on Serve's gRPC proxy.

Serve's proxy decodes each call with the generated stubs and invokes the router
deployment's method of the same name with the request message (and the call's
`grpc_context`); server-streaming methods are async generators. This module does the
protocol work for those methods: the bearer-token check, proto <-> router types, and
errors. An error sets the status code and details on the context and raises, which
Serve's proxy turns into that status for the client; an unexpected error after the
stream started ends it with INTERNAL, never a cut stream. The raised exception's class
is `router.errors.GrpcStatusError`, which the proxy can unpickle without importing the
router (see router.errors). Serve's replica logs every exception a method raises as a
failed request with its traceback; `QuietStatusErrors` drops those records for a
GrpcStatusError, which the router has already logged as one line (a WARNING for a
refused request).

Request ids: a well-formed `x-request-id` in the call's metadata becomes the request's
id, else the router makes one; the call's trailing metadata returns it as
`x-request-id` (next to Serve's own `request_id`), as does every GenerateResponse. A
W3C `traceparent` in the metadata makes the request's spans part of the client's trace.

Health: `Check` answers SERVING for "" and "pdserve.v1.PDServe" while the router sees a
live decode instance, NOT_SERVING otherwise, NOT_FOUND for other names; `Watch` streams
the same status whenever it changes. Health calls need no token, so Watch is bounded:
at most `max_health_watches` at once per router replica (RESOURCE_EXHAUSTED beyond),
each ending after `health_watch_max_s` (the client watches again). Server reflection is
Serve's (gRPCOptions.enable_reflection) and lists both services.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc_health.v1 import health_pb2

from engine import Resume
from protos.pdserve.v1 import SERVICE_NAME, pdserve_pb2
from registry import Role
from router.core import RouterCore, log_refusal
from router.errors import ErrorKind, GrpcStatusError, RouterError
from router.request_ids import grpc_metadata, grpc_request_id
from router.results import Delta
from router.validation import PROTO_FIELDS, ChatMessageIn, RawRequest, RawSampling
from telemetry.context import parse_traceparent

GRPC_STATUS: dict[ErrorKind, grpc.StatusCode] = {
    ErrorKind.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorKind.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
    ErrorKind.RESOURCE_EXHAUSTED: grpc.StatusCode.RESOURCE_EXHAUSTED,
    ErrorKind.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorKind.DEADLINE_EXCEEDED: grpc.StatusCode.DEADLINE_EXCEEDED,
    ErrorKind.INTERNAL: grpc.StatusCode.INTERNAL,
}
_FINISH = {
    "stop": pdserve_pb2.FINISH_REASON_STOP,
    "length": pdserve_pb2.FINISH_REASON_LENGTH,
    "abort": pdserve_pb2.FINISH_REASON_ABORT,
}
_ROLE = {
    Role.PREFILL: pdserve_pb2.POOL_ROLE_PREFILL,
    Role.DECODE: pdserve_pb2.POOL_ROLE_DECODE,
    Role.COLOCATED: pdserve_pb2.POOL_ROLE_COLOCATED,
}
logger = logging.getLogger(__name__)

_HEALTH_NAMES = ("", SERVICE_NAME)
_WATCH_PERIOD_S = 1.0


class QuietStatusErrors(logging.Filter):
    """For Serve's replica logger: drops its failed-request record (with traceback)
    when the exception is a GrpcStatusError, a status the router set and logged, or
    Serve's wrapper of one (whose cause it is)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        for _ in range(4):  # the error, Serve's wrapper of it, ...
            if exc is None:
                return True
            if isinstance(exc, GrpcStatusError):
                return False
            exc = exc.__cause__
        return True


def fail(context: Any, error: RouterError) -> GrpcStatusError:
    if context is not None:
        context.set_code(GRPC_STATUS[error.kind])
        context.set_details(error.message)
    return GrpcStatusError(error.message)


def raw_request(req: pdserve_pb2.GenerateRequest) -> RawRequest:
    s = req.sampling
    sampling = RawSampling(
        temperature=s.temperature if s.HasField("temperature") else None,
        top_p=s.top_p if s.HasField("top_p") else None,
        top_k=s.top_k if s.HasField("top_k") else None,
        max_tokens=s.max_tokens if s.HasField("max_tokens") else None,
        stop=tuple(s.stop),
        stop_token_ids=tuple(s.stop_token_ids),
        ignore_eos=s.ignore_eos,
        seed=s.seed if s.HasField("seed") else None,
        logprobs=s.logprobs if s.HasField("logprobs") else None,
        presence_penalty=s.presence_penalty if s.HasField("presence_penalty") else 0.0,
        frequency_penalty=s.frequency_penalty if s.HasField("frequency_penalty") else 0.0,
    )
    which = req.WhichOneof("input")
    return RawRequest(
        prompt=req.prompt if which == "prompt" else None,
        token_ids=tuple(req.token_ids.ids) if which == "token_ids" else None,
        messages=tuple(ChatMessageIn(m.role, m.content) for m in req.chat.messages)
        if which == "chat"
        else None,
        sampling=sampling,
        model=req.model,
        client_tag=req.client_tag,
        resume=Resume(tuple(req.resume.token_ids), req.resume.text_chars)
        if req.HasField("resume")
        else None,
    )


def response(delta: Delta) -> pdserve_pb2.GenerateResponse:
    msg = pdserve_pb2.GenerateResponse(
        request_id=delta.request_id, token_ids=delta.token_ids, text=delta.text
    )
    for lp in delta.logprobs:
        msg.logprobs.append(
            pdserve_pb2.TokenLogprobs(
                logprob=lp.logprob,
                top=[pdserve_pb2.TokenLogprob(token_id=t, logprob=v) for t, v in lp.top],
            )
        )
    f = delta.finish
    if f is None:
        return msg
    msg.finish_reason = _FINISH.get(f.reason, pdserve_pb2.FINISH_REASON_STOP)
    if isinstance(f.stop_reason, str):
        msg.stop_string = f.stop_reason
    elif isinstance(f.stop_reason, int):
        msg.stop_token_id = f.stop_reason
    msg.usage.CopyFrom(
        pdserve_pb2.Usage(
            prompt_tokens=f.usage.prompt_tokens,
            completion_tokens=f.usage.completion_tokens,
            cached_prompt_tokens=f.usage.cached_prompt_tokens,
        )
    )
    t = f.timings
    msg.timings.CopyFrom(
        pdserve_pb2.Timings(
            queue_ms=t.queue_ms,
            prefill_ms=t.prefill_ms,
            kv_transfer_ms=t.kv_transfer_ms,
            ttft_ms=t.ttft_ms,
            mean_tpot_ms=t.mean_tpot_ms,
            disaggregated=t.disaggregated,
            migrations=t.migrations,
        )
    )
    return msg


class GrpcFrontend:
    def __init__(self, core: RouterCore) -> None:
        self._core = core
        token = core.settings.grpc_bearer_token
        self._expected = f"Bearer {token}".encode() if token else None
        self._watches = 0

    def _authorize(self, context: Any) -> None:
        if self._expected is None:
            return
        got = ""
        if context is not None:
            for key, value in context.invocation_metadata():
                if key.lower() == "authorization":
                    got = value
        if not hmac.compare_digest(got.encode(), self._expected):
            raise fail(
                context, RouterError(ErrorKind.UNAUTHENTICATED, "missing or wrong bearer token")
            )

    async def generate(
        self, request: pdserve_pb2.GenerateRequest, context: Any
    ) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        """The request's responses; an error sets the call's status and raises
        GrpcStatusError (logged once, by the core or here)."""
        rid = grpc_request_id(context)
        limit = self._core.settings.max_request_bytes
        try:
            self._authorize(context)
            size = request.ByteSize()
            if size > limit:
                raise RouterError(
                    ErrorKind.INVALID_ARGUMENT, f"request: {size} bytes; at most {limit}", "request"
                )
        except RouterError as e:
            self._core.metrics.failed("grpc", e.kind.value)
            log_refusal(rid, "grpc", e)
            raise fail(context, e) from None
        except GrpcStatusError:  # the status is set
            log_refusal(rid, "grpc", RouterError(ErrorKind.UNAUTHENTICATED, "bad bearer token"))
            raise
        try:
            parent = parse_traceparent(grpc_metadata(context, "traceparent"))
            session = await self._core.open(raw_request(request), PROTO_FIELDS, "grpc", rid, parent)
        except RouterError as e:  # logged by the core
            raise fail(context, e) from None
        try:
            async for delta in session.stream():
                yield response(delta)
        except RouterError as e:  # logged by the session
            raise fail(context, e) from None
        except Exception:  # building a message failed: still a proper status
            logger.exception("request %s: streaming failed", session.request_id)
            raise fail(context, RouterError(ErrorKind.INTERNAL, "internal error")) from None
        finally:
            session.close()

    def list_models(self, context: Any) -> pdserve_pb2.ListModelsResponse:
        self._authorize(context)
        s = self._core.settings
        model = pdserve_pb2.ModelInfo(
            id=s.served_model, max_model_len=s.max_model_len, is_default=True
        )
        return pdserve_pb2.ListModelsResponse(models=[model])

    def cluster_status(self, context: Any) -> pdserve_pb2.ClusterStatusResponse:
        self._authorize(context)
        out = pdserve_pb2.ClusterStatusResponse(cluster=self._core.settings.cluster)
        for pool in self._core.status():
            msg = out.pools.add(
                name=pool.spec.name,
                role=_ROLE[pool.spec.role],
                replicas=pool.spec.replicas,
                tp=pool.spec.tp,
                pp=pool.spec.pp,
            )
            for inst in pool.instances:
                entry = msg.instances.add(
                    instance_id=inst.instance_id, pool=inst.pool, role=_ROLE[inst.role]
                )
                if inst.load is not None:
                    entry.load.CopyFrom(
                        pdserve_pb2.InstanceLoad(
                            queued_prefill_tokens=inst.load.queued_prefill_tokens,
                            running_seqs=inst.load.running_seqs,
                            free_kv_blocks=inst.load.free_kv_blocks,
                            total_kv_blocks=inst.load.total_kv_blocks,
                            age_ms=inst.age_s * 1000,
                        )
                    )
        return out

    def _health(self, service: str, context: Any) -> health_pb2.HealthCheckResponse:
        if service not in _HEALTH_NAMES:
            context.set_code(grpc.StatusCode.NOT_FOUND)
            context.set_details(f"unknown service {service!r}")
            raise GrpcStatusError(f"unknown service {service!r}")
        status = (
            health_pb2.HealthCheckResponse.SERVING
            if self._core.healthy()
            else health_pb2.HealthCheckResponse.NOT_SERVING
        )
        return health_pb2.HealthCheckResponse(status=status)

    def check(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> health_pb2.HealthCheckResponse:
        return self._health(request.service, context)

    async def watch(
        self, request: health_pb2.HealthCheckRequest, context: Any
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        """The status now and at each change, until the client cancels or the stream's
        lifetime ends; refused with RESOURCE_EXHAUSTED when too many are open."""
        settings = self._core.settings
        if self._watches >= settings.max_health_watches:
            error = RouterError(
                ErrorKind.RESOURCE_EXHAUSTED,
                f"{settings.max_health_watches} health watches are open; use Check or retry",
            )
            logger.warning("health watch refused: %s", error.message)
            raise fail(context, error)
        self._watches += 1
        try:
            ends = asyncio.get_running_loop().time() + settings.health_watch_max_s
            last = None
            while True:
                try:
                    current = self._health(request.service, context)
                except GrpcStatusError as e:  # an unknown service: the status is set
                    logger.warning("health watch refused: %s", e)
                    raise
                if current.status != last:
                    last = current.status
                    yield current
                left = ends - asyncio.get_running_loop().time()
                if left <= 0:
                    return
                await asyncio.sleep(min(_WATCH_PERIOD_S, left))
        finally:
            self._watches -= 1

    @property
    def open_watches(self) -> int:
        return self._watches
