"""The input is bounded before it is tokenized, and tokenizing runs off the event loop:
a 1 MiB prompt, too many chat messages or too many characters in all are refused by
name without the tokenizer ever being called; a normal prompt is tokenized in the
router's tokenizer threads."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Sequence
from pathlib import Path

import pytest
from asgi_call import call

from engine.tokenizer import ChatMessage
from router.core import RouterCore
from router.errors import ErrorKind, RouterError
from router.openai_app import OpenAIApp
from router.tokenization import PromptEncoder
from router.validation import (
    OPENAI_FIELDS,
    PROTO_FIELDS,
    ChatMessageIn,
    InvalidRequest,
    Limits,
    RawRequest,
    RequestValidator,
)

MIB = 1 << 20


class SpyEncoder(PromptEncoder):
    """The real encoder, recording which threads tokenized."""

    def __init__(self, model_dir: str) -> None:
        super().__init__(model_dir, block_size=16)
        self.threads: list[str] = []

    def encode(self, text: str) -> list[int]:
        self.threads.append(threading.current_thread().name)
        return super().encode(text)

    def chat(self, messages: Sequence[ChatMessage]) -> list[int]:
        self.threads.append(threading.current_thread().name)
        return super().chat(messages)


@pytest.fixture(scope="module")
def spy(tiny_model_dir: Path) -> SpyEncoder:
    return SpyEncoder(str(tiny_model_dir))


def _validator(spy: SpyEncoder) -> RequestValidator:
    limits = Limits(max_model_len=64, max_prompt_tokens=63, max_prompt_chars=1008, max_messages=8)
    return RequestValidator(limits, spy, "tiny")


TOO_BIG = [
    (RawRequest(prompt="x" * MIB), "prompt", "1048576 characters; at most 1008"),
    (
        RawRequest(messages=(ChatMessageIn("user", "x" * MIB),)),
        "chat.messages",
        "characters in all; at most 1008",
    ),
    (
        RawRequest(messages=tuple(ChatMessageIn("user", "hi") for _ in range(9))),
        "chat.messages",
        "9 messages; at most 8",
    ),
    (
        RawRequest(messages=(ChatMessageIn("x" * 1000, "hi"), ChatMessageIn("user", "y" * 9))),
        "chat.messages",
        "1015 characters in all",  # roles count too
    ),
]


@pytest.mark.parametrize(("raw", "field", "message"), TOO_BIG)
def test_oversized_input_is_refused_before_tokenizing(
    spy: SpyEncoder, raw: RawRequest, field: str, message: str
) -> None:
    spy.threads.clear()
    with pytest.raises(InvalidRequest) as err:
        _validator(spy).check(raw, PROTO_FIELDS)
    assert err.value.field == field and message in err.value.message
    assert spy.threads == []


def test_a_prompt_at_the_bound_is_tokenized(spy: SpyEncoder) -> None:
    spy.threads.clear()
    v = _validator(spy)
    with pytest.raises(InvalidRequest) as err:  # 1008 characters pass; too many tokens
        v.validate(RawRequest(prompt="word " * 201 + "abc"), OPENAI_FIELDS)
    assert err.value.field == "prompt" and "tokens" in err.value.message
    assert len(spy.threads) == 1
    ok = v.validate(RawRequest(prompt="Hello there"), OPENAI_FIELDS)
    assert list(ok.prompt_token_ids) == spy.encode("Hello there")


def _body(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def test_a_1mib_prompt_is_a_400_over_http_and_never_tokenized(
    router_core: RouterCore, tiny_model_dir: Path
) -> None:
    spy = SpyEncoder(str(tiny_model_dir))
    router_core.validator.encoder = spy
    app = OpenAIApp(router_core).build()

    async def run() -> None:
        reply = await call(app, "POST", "/v1/completions", _body(prompt="x" * MIB))
        assert reply.status == 400, reply.body
        err = reply.json()["error"]
        assert (err["type"], err["param"]) == ("invalid_argument", "prompt")
        assert "1048576 characters; at most 1008" in err["message"]
        big_chat = _body(messages=[{"role": "user", "content": "x" * MIB}])
        reply = await call(app, "POST", "/v1/chat/completions", big_chat)
        assert reply.status == 400 and reply.json()["error"]["param"] == "messages"
        assert spy.threads == []
        # A normal prompt is tokenized, off the loop's thread, then finds no instance.
        reply = await call(app, "POST", "/v1/completions", _body(prompt="Hello there"))
        assert reply.status == 503 and reply.json()["error"]["type"] == "unavailable"
        assert len(spy.threads) == 1
        assert spy.threads[0].startswith("router-tokenize")

    asyncio.run(run())


def test_open_tokenizes_in_the_pool_and_releases_admission_on_refusal(
    router_core: RouterCore, tiny_model_dir: Path
) -> None:
    spy = SpyEncoder(str(tiny_model_dir))
    router_core.validator.encoder = spy

    async def run() -> None:
        for raw in (RawRequest(prompt="x" * MIB), RawRequest(prompt="Hello")):
            with pytest.raises(RouterError) as err:
                await router_core.open(raw, PROTO_FIELDS, "grpc")
            assert err.value.kind in (ErrorKind.INVALID_ARGUMENT, ErrorKind.UNAVAILABLE)
            assert router_core.admission.inflight == 0
        assert spy.threads and all(t.startswith("router-tokenize") for t in spy.threads)
        assert threading.current_thread().name not in spy.threads

    asyncio.run(run())
