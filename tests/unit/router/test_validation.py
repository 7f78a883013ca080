"""Request validation: every bad field is reported by its protocol's name, and valid
requests become the engine's SamplingParams with the engine's defaults."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from engine import SamplingParams
from engine.sampling import SamplingError
from protos.pdserve.v1 import pdserve_pb2
from router.grpc_api import raw_request
from router.openai_schema import ChatBody, CompletionBody, first_error
from router.tokenization import PromptEncoder
from router.validation import (
    OPENAI_FIELDS,
    PROTO_FIELDS,
    ChatMessageIn,
    InvalidRequest,
    Limits,
    RawRequest,
    RawSampling,
    RequestValidator,
)

MAX_LEN = 64


@pytest.fixture(scope="module")
def validator(tiny_model_dir: Path) -> RequestValidator:
    encoder = PromptEncoder(str(tiny_model_dir), block_size=16)
    return RequestValidator(
        Limits(max_model_len=MAX_LEN, max_prompt_tokens=MAX_LEN - 1), encoder, "tiny"
    )


def test_valid_prompt_gets_engine_defaults(validator: RequestValidator) -> None:
    ok = validator.validate(RawRequest(prompt="Hello there"), PROTO_FIELDS)
    assert list(ok.prompt_token_ids) == validator.encoder.encode("Hello there")
    p = ok.params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens, p.seed, p.logprobs) == (
        1.0,
        1.0,
        -1,
        16,
        None,
        None,
    )


def test_sampling_fields_are_carried_over(validator: RequestValidator) -> None:
    s = RawSampling(
        temperature=0.0,
        top_p=0.5,
        top_k=4,
        max_tokens=7,
        stop=("\n",),
        stop_token_ids=(2,),
        ignore_eos=True,
        seed=3,
        logprobs=2,
    )
    p = validator.validate(RawRequest(token_ids=(5, 6, 7), sampling=s), PROTO_FIELDS).params
    assert (p.temperature, p.top_p, p.top_k, p.max_tokens) == (0.0, 0.5, 4, 7)
    assert (p.stop, p.stop_token_ids, p.ignore_eos, p.seed, p.logprobs) == (["\n"], [2], True, 3, 2)


def test_default_max_tokens_is_cut_to_the_context(validator: RequestValidator) -> None:
    ids = tuple(range(5, 5 + MAX_LEN - 4))  # 60 tokens: 4 fit after them
    assert validator.validate(RawRequest(token_ids=ids), PROTO_FIELDS).params.max_tokens == 4
    chat = RawRequest(messages=(ChatMessageIn("user", "hi"),), default_max_tokens=1000)
    assert validator.validate(chat, OPENAI_FIELDS).params.max_tokens < MAX_LEN


BAD = [
    (RawRequest(), "input"),
    (RawRequest(prompt="a", token_ids=(1,)), "input"),
    (RawRequest(prompt="a", model="other"), "model"),
    (RawRequest(prompt="a", client_tag="x" * 129), "client_tag"),
    (RawRequest(prompt=""), "prompt"),
    (RawRequest(prompt="word " * 100), "prompt"),
    (RawRequest(token_ids=tuple([5] * MAX_LEN)), "token_ids.ids"),
    (RawRequest(token_ids=(5, 49152)), "token_ids.ids[1]"),
    (RawRequest(messages=()), "chat.messages"),
    (RawRequest(messages=(ChatMessageIn("wizard", "hi"),)), "chat.messages[0].role"),
    (RawRequest(prompt="a", sampling=RawSampling(max_tokens=0)), "sampling.max_tokens"),
    (RawRequest(prompt="a", sampling=RawSampling(max_tokens=10**9)), "sampling.max_tokens"),
    (RawRequest(prompt="a", sampling=RawSampling(top_p=2.0)), "sampling.top_p"),
    (RawRequest(prompt="a", sampling=RawSampling(top_p=0.0)), "sampling.top_p"),
    (
        RawRequest(prompt="a", sampling=RawSampling(temperature=float("nan"))),
        "sampling.temperature",
    ),
    (RawRequest(prompt="a", sampling=RawSampling(top_k=-2)), "sampling.top_k"),
    (RawRequest(prompt="a", sampling=RawSampling(stop=("",))), "sampling.stop[0]"),
    (RawRequest(prompt="a", sampling=RawSampling(stop=("x" * 257,))), "sampling.stop[0]"),
    (RawRequest(prompt="a", sampling=RawSampling(stop=("s",) * 17)), "sampling.stop"),
    (
        RawRequest(prompt="a", sampling=RawSampling(stop_token_ids=(-1,))),
        "sampling.stop_token_ids[0]",
    ),
    (RawRequest(prompt="a", sampling=RawSampling(seed=2**63)), "sampling.seed"),
    (RawRequest(prompt="a", sampling=RawSampling(logprobs=21)), "sampling.logprobs"),
    (
        RawRequest(prompt="a", sampling=RawSampling(presence_penalty=2.5)),
        "sampling.presence_penalty",
    ),
]


@pytest.mark.parametrize(("raw", "field"), BAD, ids=[f"{i}-{f}" for i, (_, f) in enumerate(BAD)])
def test_bad_field_is_named(validator: RequestValidator, raw: RawRequest, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        validator.validate(raw, PROTO_FIELDS)
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")


SAMPLING_CASES = [
    RawSampling(temperature=float("inf")),
    RawSampling(temperature=-0.5),
    RawSampling(top_p=0.0),
    RawSampling(top_k=-3),
    RawSampling(max_tokens=0),
    RawSampling(stop=("s",) * 17),
    RawSampling(stop=("ok", "")),
    RawSampling(stop_token_ids=(1,) * 65),
    RawSampling(stop_token_ids=(1, 10**6)),
    RawSampling(seed=-1),
    RawSampling(logprobs=21),
    RawSampling(presence_penalty=-3.0),
    RawSampling(frequency_penalty=float("inf")),
]


@pytest.mark.parametrize("raw", SAMPLING_CASES)
def test_the_router_and_the_engine_apply_one_sampling_rule(
    validator: RequestValidator, raw: RawSampling
) -> None:
    """The router's error is the engine's, under the protocol's field name."""
    given = {k: v for k, v in dataclasses.asdict(raw).items() if v not in (None, ())}
    params = SamplingParams(**{k: list(v) if isinstance(v, tuple) else v for k, v in given.items()})
    with pytest.raises(SamplingError) as engine_err:
        params.validate(validator.encoder.vocab_size)
    with pytest.raises(InvalidRequest) as router_err:
        validator.validate(RawRequest(prompt="a", sampling=raw), OPENAI_FIELDS)
    assert router_err.value.field == engine_err.value.field  # OpenAI's names are the engine's
    assert router_err.value.message == engine_err.value.message
    with pytest.raises(InvalidRequest) as proto_err:
        validator.validate(RawRequest(prompt="a", sampling=raw), PROTO_FIELDS)
    assert proto_err.value.field == "sampling." + engine_err.value.field
    assert proto_err.value.message == engine_err.value.message


def test_a_sampling_error_names_the_element_and_survives_pickling() -> None:
    with pytest.raises(SamplingError) as err:
        SamplingParams(stop=["a", "b", ""]).validate(100)
    assert (err.value.field, str(err.value)) == ("stop[2]", "stop[2]: must be 1..256 characters")
    again = pickle.loads(pickle.dumps(err.value))
    assert isinstance(again, ValueError) and (again.field, again.message) == (
        err.value.field,
        err.value.message,
    )


def test_openai_names(validator: RequestValidator) -> None:
    with pytest.raises(InvalidRequest) as err:
        validator.validate(RawRequest(prompt="a", sampling=RawSampling(top_p=3)), OPENAI_FIELDS)
    assert err.value.field == "top_p"
    with pytest.raises(InvalidRequest) as err:
        validator.validate(RawRequest(messages=(ChatMessageIn("x", "y"),)), OPENAI_FIELDS)
    assert err.value.field == "messages[0].role"


def test_an_integer_may_be_written_as_a_number_without_a_fraction() -> None:
    raw = CompletionBody.model_validate_json(
        b'{"prompt": [1.0, 2], "max_tokens": 3.0, "seed": 0.0}'
    ).to_raw()
    assert raw.token_ids == (1, 2) and (raw.sampling.max_tokens, raw.sampling.seed) == (3, 0)
    with pytest.raises(ValidationError) as err:
        CompletionBody.model_validate_json(b'{"prompt": "a", "max_tokens": 3.5}')
    assert first_error(err.value).field == "max_tokens"


def test_openai_bodies() -> None:
    raw = CompletionBody.model_validate_json(
        b'{"prompt": [1, 2], "stop": "x", "max_tokens": 3}'
    ).to_raw()
    assert raw.token_ids == (1, 2) and raw.sampling.stop == ("x",) and raw.sampling.max_tokens == 3
    chat = ChatBody.model_validate_json(
        b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5,'
        b' "logprobs": true, "top_logprobs": 2, "user": "tag"}'
    ).to_raw(default_max_tokens=100)
    assert (
        chat.sampling.max_tokens == 5 and chat.sampling.logprobs == 2 and chat.client_tag == "tag"
    )
    with pytest.raises(InvalidRequest, match=r"^n: "):
        CompletionBody.model_validate_json(b'{"prompt": "a", "n": 3}').to_raw()
    with pytest.raises(InvalidRequest, match=r"^max_tokens: set it or max_completion_tokens"):
        ChatBody.model_validate_json(
            b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": 0,'
            b' "max_completion_tokens": 1}'
        ).to_raw(10)
    with pytest.raises(InvalidRequest, match=r"^top_logprobs: "):
        ChatBody.model_validate_json(
            b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}'
        ).to_raw(10)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        (b'{"prompt": "a", "top_p": "high"}', "top_p"),
        (b'{"prompt": {"x": 1}}', "prompt"),
        (b'{"prompt": [1, "two"]}', "prompt"),  # a union: the field, not the member
        (b'{"prompt": "a", "max_tokens": "5"}', "max_tokens"),  # strict: never coerced
        (b'{"prompt": "a", "stream": 0}', "stream"),
        (
            b'{"prompt": "a", "stream_options": {"include_obfuscation": 0}}',
            "stream_options.include_obfuscation",
        ),
    ],
)
def test_schema_errors_name_the_field(body: bytes, field: str) -> None:
    with pytest.raises(ValidationError) as err:
        CompletionBody.model_validate_json(body)
    assert first_error(err.value).field == field


def test_chat_schema_error_names_message_field() -> None:
    with pytest.raises(ValidationError) as err:
        ChatBody.model_validate_json(b'{"messages": [{"content": "hi"}]}')
    assert first_error(err.value).field == "messages[0].role"
    with pytest.raises(InvalidRequest, match=r"^messages\[0\]\.content: is required"):
        ChatBody.model_validate_json(b'{"messages": [{"role": "user"}]}').to_raw(10)


def test_grpc_penalties_reach_the_sampling_rule(validator: RequestValidator) -> None:
    """The proto's penalties are carried as set, unset is 0, and the one rule names the
    field by its proto path."""
    msg = pdserve_pb2.GenerateRequest(prompt="Hello")
    msg.sampling.presence_penalty = 0.5
    msg.sampling.frequency_penalty = -1.25
    params = validator.validate(raw_request(msg), PROTO_FIELDS).params
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.25)
    unset = validator.validate(raw_request(pdserve_pb2.GenerateRequest(prompt="Hi")), PROTO_FIELDS)
    assert (unset.params.presence_penalty, unset.params.frequency_penalty) == (0.0, 0.0)
    msg.sampling.frequency_penalty = 2.5
    with pytest.raises(InvalidRequest) as err:
        validator.validate(raw_request(msg), PROTO_FIELDS)
    assert err.value.field == "sampling.frequency_penalty"


def _resumed(validator: RequestValidator, ids: list[int], chars: int, max_tokens: int = 8) -> Any:
    req = pdserve_pb2.GenerateRequest(prompt="Hello there")
    req.sampling.max_tokens = max_tokens
    req.resume.token_ids.extend(ids)
    req.resume.text_chars = chars
    return validator.validate(raw_request(req), PROTO_FIELDS)


def test_a_resumed_request_carries_its_tokens_and_text(validator: RequestValidator) -> None:
    ids = validator.encoder.encode(" and then")
    ok = _resumed(validator, ids, 3)
    assert ok.resume is not None
    assert ok.resume.output_token_ids == tuple(ids) and ok.resume.text_chars_sent == 3
    plain = validator.validate(RawRequest(prompt="Hello there"), PROTO_FIELDS)
    assert plain.resume is None


@pytest.mark.parametrize(
    ("ids", "chars", "max_tokens", "field"),
    [
        ([], 0, 8, "resume.token_ids"),  # the field set, with no token
        (list(range(MAX_LEN)), 0, 8, "resume.token_ids"),  # bounded before tokenizing
        ([5, 10**6], 0, 8, "resume.token_ids[1]"),
        ([5, 6, 7], 0, 3, "resume.token_ids"),  # leaves nothing of max_tokens
        ([5, 6], 10**6, 8, "resume.text_chars"),  # more text than the tokens make
    ],
)
def test_a_bad_resume_is_named(
    validator: RequestValidator, ids: list[int], chars: int, max_tokens: int, field: str
) -> None:
    with pytest.raises(InvalidRequest) as e:
        _resumed(validator, ids, chars, max_tokens)
    assert e.value.field == field
