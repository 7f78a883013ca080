"""Generated requests against the router's validation, in-process: random protobuf
messages through the gRPC servicer and random JSON bodies through the OpenAI app. Every
outcome is a refusal in the protocol's shape (400 / INVALID_ARGUMENT, 413) or, for a
valid request, UNAVAILABLE (no instance is registered); never another exception, a
5xx other than 503, or a leaked admission slot."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import grpc
import pytest
from asgi_call import call
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from router_core import CallContext

from protos.pdserve.v1 import pdserve_pb2
from router.core import RouterCore
from router.errors import GrpcStatusError
from router.grpc_api import GrpcFrontend
from router.openai_app import OpenAIApp

_FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
_U32 = st.integers(0, 2**32 - 1)
_TEXT = st.text(max_size=40)

_sampling = st.builds(
    pdserve_pb2.SamplingParams,
    temperature=st.none() | st.floats(width=32),
    top_p=st.none() | st.floats(width=32),
    top_k=st.none() | st.integers(-(2**31), 2**31 - 1),
    max_tokens=st.none() | _U32,
    stop=st.lists(_TEXT, max_size=20),
    stop_token_ids=st.lists(_U32, max_size=70),
    ignore_eos=st.booleans(),
    seed=st.none() | st.integers(0, 2**64 - 1),
    logprobs=st.none() | _U32,
)
_chat = st.builds(
    pdserve_pb2.ChatMessages,
    messages=st.lists(
        st.builds(
            pdserve_pb2.ChatMessage,
            role=st.sampled_from(["system", "user", "assistant", "tool", "", "wizard"]),
            content=_TEXT,
        ),
        max_size=10,
    ),
)


@st.composite
def generate_requests(draw: st.DrawFn) -> pdserve_pb2.GenerateRequest:
    msg = pdserve_pb2.GenerateRequest(
        model=draw(st.sampled_from(["", "tiny", "other"])),
        client_tag=draw(st.text(max_size=140)),
    )
    which = draw(st.sampled_from(["none", "prompt", "token_ids", "chat"]))
    if which == "prompt":
        msg.prompt = draw(st.text(max_size=200) | st.just("x" * 5000))
    elif which == "token_ids":
        msg.token_ids.ids.extend(draw(st.lists(_U32 | st.integers(0, 100), max_size=80)))
    elif which == "chat":
        msg.chat.CopyFrom(draw(_chat))
    if draw(st.booleans()):
        msg.sampling.CopyFrom(draw(_sampling))
    return msg


_OK_GRPC = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.UNAVAILABLE}


@_FUZZ
@given(request=generate_requests())
def test_generated_protobuf_requests_get_a_status(
    router_core: RouterCore, request: pdserve_pb2.GenerateRequest
) -> None:
    frontend = GrpcFrontend(router_core)

    async def run() -> tuple[CallContext, list[Any]]:
        context = CallContext()
        out: list[Any] = []
        with pytest.raises(GrpcStatusError):  # the status is on the context
            out.extend([m async for m in frontend.generate(request, context)])
        return context, out

    context, out = asyncio.run(run())
    assert out == [] and context.code in _OK_GRPC, (context.code, context.details)
    assert context.details
    assert router_core.admission.inflight == 0


_FIELDS = [
    "model", "prompt", "messages", "max_tokens", "max_completion_tokens", "temperature",
    "top_p", "top_k", "stop", "stop_token_ids", "ignore_eos", "seed", "stream",
    "stream_options", "user", "n", "presence_penalty", "frequency_penalty", "logit_bias",
    "logprobs", "top_logprobs", "echo", "best_of", "suffix", "tools", "tool_choice",
    "response_format", "store", "metadata", "service_tier", "modalities", "unknown_x",
]  # fmt: skip
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXT, inner, max_size=4),
    max_leaves=12,
)
_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["user", "system", "developer", "x"]), "content": _TEXT},
    optional={"name": _TEXT, "extra": _json},
)
_values = st.one_of(
    _json, st.lists(_message, max_size=4), st.lists(st.integers(-5, 50000), max_size=8)
)
_bodies = st.dictionaries(st.sampled_from(_FIELDS), _values, max_size=8)


@_FUZZ
@given(
    path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]),
    body=_bodies | _json,
    raw=st.none() | st.binary(max_size=64),
)
def test_generated_json_bodies_get_an_openai_answer(
    router_core: RouterCore, path: str, body: Any, raw: bytes | None
) -> None:
    app = OpenAIApp(router_core).build()
    data = raw if raw is not None else json.dumps(body).encode()
    reply = asyncio.run(call(app, "POST", path, data))
    assert reply.status in (400, 413, 503), (reply.status, reply.body[:300])
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert router_core.admission.inflight == 0
