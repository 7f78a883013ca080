"""Fuzzing the live router over its sockets (tests/live_api.py: uvicorn and grpc.aio on
loopback, a real RouterCore, one real colocated replica on a tiny random Llama).

- HTTP: schemathesis reads the running app's /openapi.json and sends the cases it
  generates from it, valid and invalid (positive and negative modes), checking each
  answer against the document; we add that none is a 5xx and every error is OpenAI's.
- gRPC: hypothesis builds GenerateRequest messages, two in five of them valid, sends
  them over a channel and sometimes cancels the call after the first message.

Every case ends in a served completion or a refusal in the protocol's shape (400 /
INVALID_ARGUMENT naming the field, 413), never a 5xx, INTERNAL or UNKNOWN; the module
ends with the leak check (admission slots, engine requests, streams, KV blocks, the
handle's calls) and, once the replica is closed, a clean registry. Generation is
derandomized (a fixed seed, no example database) and the number of cases fixed. The
figures go to the summary.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from live_api import LiveRouter, live_router
from schemathesis.specs.openapi.checks import positive_data_acceptance

from cluster.redis_server import RedisServer
from protos.pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc

GRPC_CASES = 2000
VOCAB = 49152


def fuzz_settings(cases: int) -> settings:
    return settings(
        max_examples=cases,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, redis_server: RedisServer) -> Iterator[LiveRouter]:
    with live_router(tiny_model_dir, redis_server.url) as router:
        yield router


# -- gRPC -----------------------------------------------------------------------------

_U32 = st.integers(0, 2**32 - 1)
_I32 = st.integers(-(2**31), 2**31 - 1)
_TEXT = st.text(max_size=40)
_SAFE_TEXT = st.text(min_size=1, max_size=30)

# Per field: a value the server takes, and anything of the field's type.
_SAMPLING_FIELDS: dict[str, tuple[st.SearchStrategy[object], st.SearchStrategy[object]]] = {
    "temperature": (st.floats(0, 2), st.floats(width=32)),
    "top_p": (st.floats(0.05, 1), st.floats(width=32)),
    "top_k": (st.integers(-1, 50), _I32),
    "max_tokens": (st.integers(1, 4), _U32),
    "stop": (st.lists(st.text(min_size=1, max_size=5), max_size=3), st.lists(_TEXT, max_size=20)),
    "stop_token_ids": (
        st.lists(st.integers(0, VOCAB - 1), max_size=3),
        st.lists(_U32, max_size=70),
    ),
    "ignore_eos": (st.booleans(), st.booleans()),
    "seed": (st.integers(0, 2**63 - 1), st.integers(0, 2**64 - 1)),
    "logprobs": (st.integers(0, 5), _U32),
    "presence_penalty": (st.floats(-2, 2), st.floats(width=32)),
    "frequency_penalty": (st.floats(-2, 2), st.floats(width=32)),
}


def _sampling(wild: bool) -> st.SearchStrategy[pdserve_pb2.SamplingParams]:
    """Sane: every field the server takes (max_tokens small, so that serving stays
    quick); wild: each field anything of its type."""
    fields = {k: wild_s if wild else sane for k, (sane, wild_s) in _SAMPLING_FIELDS.items()}
    required = {} if wild else {"max_tokens": fields.pop("max_tokens")}
    return st.fixed_dictionaries(required, optional=fields).map(
        lambda kw: pdserve_pb2.SamplingParams(**kw)
    )


def _input(wild: bool) -> st.SearchStrategy[tuple[str, object]]:
    roles = ["system", "user", "assistant"] + (["", "tool", "x"] if wild else [])
    messages = st.lists(
        st.builds(
            pdserve_pb2.ChatMessage,
            role=st.sampled_from(roles),
            content=_TEXT if wild else _SAFE_TEXT,
        ),
        min_size=0 if wild else 1,
        max_size=10 if wild else 3,
    )
    if wild:
        ids = st.lists(st.integers(0, VOCAB - 1) | _U32, max_size=80)
        prompt = st.text(max_size=200) | st.just("x" * 5000)
    else:
        ids = st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=30)
        prompt = _SAFE_TEXT
    inputs = [
        st.tuples(st.just("prompt"), prompt),
        st.tuples(st.just("token_ids"), ids),
        st.tuples(st.just("chat"), messages),
    ]
    if wild:
        inputs.append(st.tuples(st.just("none"), st.none()))
    return st.one_of(inputs)


@st.composite
def generate_requests(draw: st.DrawFn) -> pdserve_pb2.GenerateRequest:
    """Two in five sane (served unless a sane value still breaks a bound, such as a
    chat template past the context), the others wild (most are refused)."""
    wild = draw(st.integers(0, 4)) >= 2
    msg = pdserve_pb2.GenerateRequest(
        model=draw(st.sampled_from(["", "tiny", "other"] if wild else ["", "tiny"])),
        client_tag=draw(st.text(max_size=140) if wild else st.text(max_size=20)),
    )
    which, value = draw(_input(wild))
    if which == "prompt":
        msg.prompt = value
    elif which == "token_ids":
        msg.token_ids.ids.extend(value)
    elif which == "chat":
        msg.chat.CopyFrom(pdserve_pb2.ChatMessages(messages=value))
    if not wild or draw(st.booleans()):
        msg.sampling.CopyFrom(draw(_sampling(wild)))
    return msg


def _send(
    stub: pdserve_pb2_grpc.PDServeStub, request: pdserve_pb2.GenerateRequest, cancel: bool
) -> str:
    """One call; its outcome as a label, or an AssertionError."""
    call = stub.Generate(request, timeout=60)
    messages = []
    try:
        for msg in call:
            messages.append(msg)
            if cancel:
                call.cancel()
    except grpc.RpcError as e:
        code, details = e.code(), e.details() or ""
        if code is grpc.StatusCode.CANCELLED and cancel and messages:
            return "cancelled"
        assert code is grpc.StatusCode.INVALID_ARGUMENT, (code, details, request)
        assert details.split(":")[0], (details, request)
        return "INVALID_ARGUMENT"
    last = messages[-1]
    assert last.finish_reason != pdserve_pb2.FINISH_REASON_UNSPECIFIED, request
    assert last.usage.completion_tokens == sum(len(m.token_ids) for m in messages)
    return "served"


def test_generated_protobuf_messages_over_a_channel(
    live: LiveRouter, fuzz_figures: list[str]
) -> None:
    outcomes: Counter[str] = Counter()
    started, cpu = time.monotonic(), time.process_time()
    with grpc.insecure_channel(live.grpc_target) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)

        @fuzz_settings(GRPC_CASES)
        @given(request=generate_requests(), cancel=st.integers(0, 9).map(lambda i: i == 0))
        def case(request: pdserve_pb2.GenerateRequest, cancel: bool) -> None:
            outcomes[_send(stub, request, cancel)] += 1

        case()
    took, cpu = time.monotonic() - started, time.process_time() - cpu
    total = sum(outcomes.values())
    fuzz_figures.append(
        f"gRPC Generate over a channel: {total} cases, 0 failures, {took:.1f} s wall, "
        f"{cpu:.1f} s CPU ({', '.join(f'{k} {v}' for k, v in sorted(outcomes.items()))})"
    )
    assert total >= GRPC_CASES
    assert outcomes["served"] >= GRPC_CASES // 5  # the fuzz reaches generation
    live.assert_idle()


# -- HTTP -----------------------------------------------------------------------------

# Cases per POST operation and generation mode, 2,000 in all: the chat body's schema is
# the costlier to generate from (its invalid variants most of all).
HTTP_CASES = {
    ("/v1/completions", "positive"): 750,
    ("/v1/completions", "negative"): 650,
    ("/v1/chat/completions", "positive"): 400,
    ("/v1/chat/completions", "negative"): 200,
}


# The fields whose bounds the document states in full: a body valid by the document
# is never refused for one of them. Other refusals of valid bodies are by bounds that
# depend on the request or the deployment (token counts against the context, the
# vocabulary, the served model, logprobs and stop limits) or by a value asking for
# something not supported (n > 1, tools, ...), which the document cannot express.
_STATED = {
    "temperature", "top_p", "top_k", "seed", "presence_penalty", "frequency_penalty",
    "max_completion_tokens",
}  # fmt: skip
# Schemathesis's check that every schema-valid body gets a 2xx, replaced by the one above
_EXCLUDED = [positive_data_acceptance]


def _check_answer(
    response: schemathesis.Response, case: schemathesis.Case, mode: schemathesis.GenerationMode
) -> str:
    """Our own checks on top of schemathesis's: the outcome as a label."""
    status, text = response.status_code, response.content.decode(errors="replace")
    assert status < 500, (status, text[:300], case.body)
    if status >= 400:
        error = json.loads(text)["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], error
        if mode is schemathesis.GenerationMode.POSITIVE and status == 400:
            assert error["param"] not in _STATED, (error, case.body)
        return str(status)
    if response.headers.get("content-type", [""])[0].startswith("text/event-stream"):
        assert text.endswith("data: [DONE]\n\n"), text[-300:]
        assert '"error"' not in text, text[-300:]
        return f"{status} stream"
    return str(status)


def _fuzz(
    operation: schemathesis.APIOperation,
    mode: schemathesis.GenerationMode,
    cases: int,
    live: LiveRouter,
    session: requests.Session,
    outcomes: Counter[str],
) -> None:
    @fuzz_settings(cases)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        response = case.call(base_url=live.http_url, session=session, timeout=60)
        case.validate_response(response, excluded_checks=_EXCLUDED)
        outcomes[f"{operation.label} {mode.value} {_check_answer(response, case, mode)}"] += 1

    run()


def test_schemathesis_against_the_running_api(live: LiveRouter, fuzz_figures: list[str]) -> None:
    schema = schemathesis.openapi.from_url(f"{live.http_url}/openapi.json", timeout=30)
    outcomes: Counter[str] = Counter()
    started, cpu = time.monotonic(), time.process_time()
    with requests.Session() as session:
        for result in schema.get_all_operations():
            operation = result.ok()
            if operation.method.upper() == "POST":
                for mode in schemathesis.GenerationMode:
                    cases = HTTP_CASES[operation.path, mode.value]
                    _fuzz(operation, mode, cases, live, session, outcomes)
            else:  # no body and no parameters: a few cases, and no invalid variant
                _fuzz(operation, schemathesis.GenerationMode.POSITIVE, 5, live, session, outcomes)
    took, cpu = time.monotonic() - started, time.process_time() - cpu
    total = sum(outcomes.values())
    fuzz_figures.append(
        f"HTTP by schemathesis: {total} cases, 0 failures, {took:.1f} s wall, {cpu:.1f} s CPU"
    )
    fuzz_figures.extend(f"  {k}: {v}" for k, v in sorted(outcomes.items()))
    posts = sum(v for k, v in outcomes.items() if k.startswith("POST"))
    assert posts >= sum(HTTP_CASES.values())
    assert sum(v for k, v in outcomes.items() if k.startswith("POST") and " 200" in k) > 0
    live.assert_idle()
