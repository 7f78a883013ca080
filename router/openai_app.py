"""The OpenAI-compatible HTTP API on Serve's HTTP proxy.

    POST /v1/completions        prompt text or token ids; stream=true for SSE
    POST /v1/chat/completions   messages; stream=true for SSE
    GET  /v1/models
    GET  /openapi.json          the API's OpenAPI description, request bodies included
    GET  /health                200 while a decode instance is live, else 503 (no key)
    GET  /metrics               Prometheus text format

A request past the router's admission bound is refused (429) before its body is
read: on Serve's HTTP proxy the body is a call back into the proxy, which queues behind
every other arrival in an overload. Bodies are read with a size bound (413 beyond it)
and parsed with the schemas in `openai_schema`; any bad field is a 400 in OpenAI's
error shape, with the field named in `param`. With an API key configured, every route
but /health needs `Authorization: Bearer <key>`. Streams are server-sent events
ending in `data: [DONE]`; an error after the stream started, whatever its cause, is
sent as an `error` event followed by `data: [DONE]`, never as a cut connection. When
the client goes away, Serve cancels the handler and the request is aborted on every
pool.

Each choice also carries the generated `token_ids`, and the last message `timings`
(the TTFT breakdown), as pdserve extensions.

Request ids: a well-formed `x-request-id` on the request (1-128 of `A-Za-z0-9._:-`;
Serve's HTTP proxy adds one of its own when the client sent none) becomes the request's
id, else the router makes one. Every reply names it in `x-request-id`: Serve's proxy
echoes the header it passed in, and the app adds the header when it chose the id. A
W3C `traceparent` header makes the request's spans part of the client's trace.
"""

from __future__ import annotations

import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.background import BackgroundTask

from router.core import RouterCore, Session, log_refusal
from router.errors import HTTP_STATUS, ErrorKind, RouterError
from router.openai_schema import ChatBody, CompletionBody, first_error
from router.openapi_doc import openapi_document
from router.request_ids import RequestId
from router.results import Delta, Finish
from router.validation import OPENAI_FIELDS, InvalidRequest, RawRequest
from telemetry import TraceContext
from telemetry.context import parse_traceparent

logger = logging.getLogger(__name__)


def _error(kind: ErrorKind, message: str, param: str | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": kind.value, "param": param, "code": None}}
    return JSONResponse(body, status_code=HTTP_STATUS[kind])


def _from(e: RouterError, status: int | None = None, rid: RequestId | None = None) -> JSONResponse:
    reply = _error(e.kind, e.message, e.field)
    if status is not None:
        reply.status_code = status
    if rid is not None:
        reply.headers.update(rid.headers)
    return reply


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(
    body: bytes, chat: bool, default_chat_max_tokens: int
) -> tuple[ChatBody | CompletionBody, RawRequest]:
    """The body by its schema, and the request it makes."""
    if chat:
        chat_body = ChatBody.model_validate_json(body)
        return chat_body, chat_body.to_raw(default_chat_max_tokens)
    parsed = CompletionBody.model_validate_json(body)
    return parsed, parsed.to_raw()


def _usage(f: Finish) -> dict[str, Any]:
    u = f.usage
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


def _timings(f: Finish) -> dict[str, Any]:
    t = f.timings
    return {
        "queue_ms": t.queue_ms,
        "prefill_ms": t.prefill_ms,
        "kv_transfer_ms": t.kv_transfer_ms,
        "ttft_ms": t.ttft_ms,
        "mean_tpot_ms": t.mean_tpot_ms,
        "disaggregated": t.disaggregated,
        "migrations": t.migrations,
    }


class OpenAIApp:
    def __init__(self, core: RouterCore) -> None:
        self._core = core
        key = core.settings.http_api_key
        self._expected = f"Bearer {key}".encode() if key else None
        self._tok = core.encoder.tokenizer

    def _authorized(self, request: Request) -> bool:
        if self._expected is None:
            return True
        got = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(got, self._expected)

    def _unauthorized(self) -> JSONResponse:
        return _error(ErrorKind.UNAUTHENTICATED, "missing or wrong API key")

    def build(self) -> FastAPI:
        app = FastAPI(title="pdserve", docs_url=None, redoc_url=None, openapi_url=None)

        @app.get("/health")
        async def health() -> Response:
            ok = self._core.healthy()
            return JSONResponse(
                {"status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503
            )

        @app.get("/metrics")
        async def metrics(request: Request) -> Response:
            if not self._authorized(request):
                return self._unauthorized()
            return Response(self._core.metrics.render(), media_type="text/plain; version=0.0.4")

        @app.get("/v1/models")
        async def models(request: Request) -> Response:
            if not self._authorized(request):
                return self._unauthorized()
            s = self._core.settings
            card = {
                "id": s.served_model,
                "object": "model",
                "owned_by": "pdserve",
                "max_model_len": s.max_model_len,
            }
            return JSONResponse({"object": "list", "data": [card]})

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._handle(request, chat=False)

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._handle(request, chat=True)

        @app.get("/openapi.json", include_in_schema=False)
        async def openapi(request: Request) -> Response:
            if not self._authorized(request):
                return self._unauthorized()
            return JSONResponse(openapi_document(app))

        return app

    async def _handle(self, request: Request, chat: bool) -> Response:
        rid = RequestId(request)
        if not self._authorized(request):
            error = RouterError(ErrorKind.UNAUTHENTICATED, "missing or wrong key")
            log_refusal(rid.value, "http", error)
            reply = self._unauthorized()
            reply.headers.update(rid.headers)
            return reply
        parent = parse_traceparent(request.headers.get("traceparent"))
        try:  # before the body is read: a full router refuses without waiting on it
            self._core.admit(rid.value, "http", parent)
        except RouterError as e:  # logged by the core
            return _from(e, rid=rid)
        opened = await self._open(request, chat, rid, parent)
        if isinstance(opened, Response):
            return opened
        session, parsed = opened
        renderer = _Renderer(self._core.settings.served_model, chat, self._tok, session.request_id)
        if parsed.stream:
            return StreamingResponse(
                self._sse(session, renderer, parsed.include_usage),
                media_type="text/event-stream",
                headers=rid.headers,
                background=BackgroundTask(session.close),  # if the stream never starts
            )
        return await self._complete(session, renderer, rid)

    async def _open(
        self, request: Request, chat: bool, rid: RequestId, parent: TraceContext | None
    ) -> tuple[Session, ChatBody | CompletionBody] | Response:
        """Read and parse the body and open the session on the slot `admit` took, or
        the refusal; every way out without a session gives the slot back."""
        limit = self._core.settings.max_request_bytes
        try:
            body = await _read_body(request, limit)
            parsed, raw = _parse(body, chat, self._core.settings.default_chat_max_tokens)
        except _TooLarge:
            error = RouterError(ErrorKind.INVALID_ARGUMENT, f"body exceeds {limit} bytes")
            self._refused(rid, error)
            return _from(error, status=413, rid=rid)
        except (ValidationError, InvalidRequest) as e:
            err = first_error(e) if isinstance(e, ValidationError) else e
            error = RouterError(ErrorKind.INVALID_ARGUMENT, str(err), err.field)
            self._refused(rid, error)
            return _from(error, rid=rid)
        except BaseException:  # the client went away while sending its body
            self._core.reject("http", "cancelled")
            raise
        try:
            session = await self._core.open(
                raw, OPENAI_FIELDS, "http", rid.value, parent, admitted=True
            )
        except RouterError as e:  # logged by the core, which gave the slot back
            return _from(e, rid=rid)
        return session, parsed

    def _refused(self, rid: RequestId, error: RouterError) -> None:
        """An admitted request refused before its session opened: the slot goes back."""
        self._core.reject("http", error.kind.value)
        log_refusal(rid.value, "http", error)

    async def _complete(self, session: Session, r: _Renderer, rid: RequestId) -> Response:
        deltas: list[Delta] = []
        try:
            async for delta in session.stream():
                deltas.append(delta)
        except RouterError as e:
            return _from(e, rid=rid)
        except Exception:
            logger.exception("request %s: rendering failed", session.request_id)
            reply = _error(ErrorKind.INTERNAL, "internal error")
            reply.headers.update(rid.headers)
            return reply
        finally:
            session.close()
        return JSONResponse(r.whole(deltas), headers=rid.headers)

    async def _sse(
        self, session: Session, r: _Renderer, include_usage: bool
    ) -> AsyncIterator[bytes]:
        try:
            if r.chat:
                yield _event(r.chunk_head())
            async for delta in session.stream():
                yield _event(r.chunk(delta))
                if delta.finish is not None and include_usage:
                    yield _event(r.usage_chunk(delta.finish))
        except RouterError as e:
            yield _error_event(e.kind, e.message, e.field)
        except Exception:  # rendering failed: the client still gets a proper ending
            logger.exception("request %s: streaming failed", session.request_id)
            yield _error_event(ErrorKind.INTERNAL, "internal error", None)
        finally:
            session.close()
        yield b"data: [DONE]\n\n"


def _event(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, separators=(",", ":")).encode() + b"\n\n"


def _error_event(kind: ErrorKind, message: str, param: str | None) -> bytes:
    return _event({"error": {"message": message, "type": kind.value, "param": param}})


class _Renderer:
    """OpenAI response objects for one request."""

    def __init__(self, model: str, chat: bool, tokenizer: Any, request_id: str) -> None:
        self.model = model
        self.chat = chat
        self._tok = tokenizer
        self.id = ("chatcmpl-" if chat else "cmpl-") + request_id.removeprefix("req-")
        self.created = int(time.time())

    def _base(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def _logprobs(self, deltas: list[Delta]) -> dict[str, Any] | list[dict[str, Any]] | None:
        lps = [(tok, lp) for d in deltas for tok, lp in zip(d.token_ids, d.logprobs, strict=False)]
        if not any(d.logprobs for d in deltas):
            return None
        piece = self._tok.decode
        if self.chat:
            return [
                {
                    "token": piece([tok], skip_special_tokens=False),
                    "logprob": lp.logprob,
                    "top_logprobs": [
                        {"token": piece([t], skip_special_tokens=False), "logprob": v}
                        for t, v in lp.top
                    ],
                }
                for tok, lp in lps
            ]
        return {
            "tokens": [piece([tok], skip_special_tokens=False) for tok, _ in lps],
            "token_logprobs": [lp.logprob for _, lp in lps],
            "top_logprobs": [
                {piece([t], skip_special_tokens=False): v for t, v in lp.top} for _, lp in lps
            ],
        }

    def whole(self, deltas: list[Delta]) -> dict[str, Any]:
        finish = deltas[-1].finish if deltas else None
        text = "".join(d.text for d in deltas)
        ids = [t for d in deltas for t in d.token_ids]
        logprobs = self._logprobs(deltas)
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": finish.reason if finish else None,
            "token_ids": ids,
        }
        if self.chat:
            choice["message"] = {"role": "assistant", "content": text}
            choice["logprobs"] = {"content": logprobs} if logprobs is not None else None
            out = self._base("chat.completion")
        else:
            choice["text"] = text
            choice["logprobs"] = logprobs
            out = self._base("text_completion")
        out["choices"] = [choice]
        if finish is not None:
            out["usage"] = _usage(finish)
            out["timings"] = _timings(finish)
        return out

    def chunk_head(self) -> dict[str, Any]:
        out = self._base("chat.completion.chunk")
        out["choices"] = [
            {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        ]
        return out

    def chunk(self, delta: Delta) -> dict[str, Any]:
        f = delta.finish
        logprobs = self._logprobs([delta])
        choice: dict[str, Any] = {
            "index": 0,
            "finish_reason": f.reason if f else None,
            "token_ids": list(delta.token_ids),
        }
        if self.chat:
            choice["delta"] = {"content": delta.text}
            choice["logprobs"] = {"content": logprobs} if logprobs is not None else None
            out = self._base("chat.completion.chunk")
        else:
            choice["text"] = delta.text
            choice["logprobs"] = logprobs
            out = self._base("text_completion")
        out["choices"] = [choice]
        if f is not None:
            out["timings"] = _timings(f)
        return out

    def usage_chunk(self, f: Finish) -> dict[str, Any]:
        out = self._base("chat.completion.chunk" if self.chat else "text_completion")
        out["choices"] = []
        out["usage"] = _usage(f)
        return out
