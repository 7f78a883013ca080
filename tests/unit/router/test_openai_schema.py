"""The OpenAI bodies are strict: an unknown field is a 400 naming it, every documented
field is honoured or refused by name, and /openapi.json describes the bodies."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from asgi_call import call
from pydantic import ValidationError

from router.core import RouterCore
from router.openai_app import OpenAIApp
from router.openai_schema import ChatBody, CompletionBody, first_error
from router.validation import InvalidRequest

MSG = [{"role": "user", "content": "hi"}]

REFUSED_CHAT = [
    ("n", 2),
    ("logit_bias", {"42": 5}),
    ("tools", [{"type": "function", "function": {"name": "f"}}]),
    ("tool_choice", "auto"),
    ("parallel_tool_calls", True),
    ("functions", [{"name": "f"}]),
    ("function_call", "auto"),
    ("response_format", {"type": "json_object"}),
    ("audio", {"voice": "alloy", "format": "wav"}),
    ("modalities", ["text", "audio"]),
    ("prediction", {"type": "content", "content": "x"}),
    ("reasoning_effort", "high"),
    ("verbosity", "low"),
    ("web_search_options", {}),
    ("store", True),
    ("metadata", {"k": "v"}),
    ("service_tier", "flex"),
]
REFUSED_COMPLETION = [("n", 3), ("best_of", 2), ("echo", True), ("suffix", "end")]
NOOPS_CHAT: dict[str, Any] = {
    "n": 1,
    "logit_bias": {},
    "tool_choice": "none",
    "response_format": {"type": "text"},
    "modalities": ["text"],
    "store": False,
    "service_tier": "auto",
    "prompt_cache_key": "k",
    "stream_options": {"include_usage": True},
}


@pytest.mark.parametrize(("field", "value"), REFUSED_CHAT)
def test_chat_fields_asking_for_what_is_not_done_are_refused_by_name(
    field: str, value: object
) -> None:
    body = ChatBody.model_validate({"messages": MSG, field: value})
    with pytest.raises(InvalidRequest) as err:
        body.to_raw(10)
    assert err.value.field == field


@pytest.mark.parametrize(("field", "value"), REFUSED_COMPLETION)
def test_completion_fields_asking_for_what_is_not_done_are_refused_by_name(
    field: str, value: object
) -> None:
    with pytest.raises(InvalidRequest) as err:
        CompletionBody.model_validate({"prompt": "a", field: value}).to_raw()
    assert err.value.field == field


def test_values_that_ask_for_nothing_are_accepted() -> None:
    raw = ChatBody.model_validate({"messages": MSG, **NOOPS_CHAT}).to_raw(10)
    assert raw.messages is not None and raw.messages[0].content == "hi"
    raw = CompletionBody.model_validate(
        {"prompt": "a", "n": 1, "best_of": 1, "echo": False, "suffix": None}
    ).to_raw()
    assert raw.prompt == "a"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"messages": MSG, "frobnicate": 1}, "frobnicate"),
        ({"messages": [{"role": "user", "content": "hi", "mood": "x"}]}, "messages[0].mood"),
        ({"messages": MSG, "stream_options": {"x": 1}}, "stream_options.x"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, None),
        ({"prompt": "a", "echo": True}, "prompt"),  # a completion field, not a chat one
    ],
)
def test_unknown_fields_are_named(body: dict[str, Any], field: str | None) -> None:
    with pytest.raises(ValidationError) as err:
        ChatBody.model_validate(body)
    named = first_error(err.value)
    if field is None:  # a non-text content part: the content is named
        assert named.field == "messages[0].content"
    else:
        assert (named.field, named.message) == (field, "is not a field of this request")


def test_penalties_content_parts_and_developer_role_are_honoured() -> None:
    raw = ChatBody.model_validate(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
                },
            ],
            "presence_penalty": 0.5,
            "frequency_penalty": -1.0,
        }
    ).to_raw(10)
    assert raw.messages is not None
    assert [(m.role, m.content) for m in raw.messages] == [("system", "be brief"), ("user", "ab")]
    assert (raw.sampling.presence_penalty, raw.sampling.frequency_penalty) == (0.5, -1.0)
    for name in ("name", "tool_call_id", "refusal"):
        with pytest.raises(InvalidRequest) as err:
            ChatBody.model_validate(
                {"messages": [{"role": "user", "content": "x", name: "y"}]}
            ).to_raw(10)
        assert err.value.field == f"messages[0].{name}"


def test_http_400s_name_the_field_and_openapi_describes_the_bodies(
    router_core: RouterCore,
) -> None:
    app = OpenAIApp(router_core).build()

    async def run() -> None:
        cases = [
            ("/v1/chat/completions", {"messages": MSG, "best_friend": 1}, "best_friend"),
            ("/v1/chat/completions", {"messages": MSG, "tools": []}, "tools"),
            ("/v1/chat/completions", {"messages": MSG, "presence_penalty": 3}, "presence_penalty"),
            ("/v1/completions", {"prompt": "a", "best_of": 4}, "best_of"),
            ("/v1/completions", {"prompt": "a", "frequency_penalty": -2.5}, "frequency_penalty"),
        ]
        for path, body, field in cases:
            reply = await call(app, "POST", path, json.dumps(body).encode())
            assert reply.status == 400, (body, reply.body)
            err = reply.json()["error"]
            assert (err["type"], err["param"], err["code"]) == ("invalid_argument", field, None)
            assert err["message"].startswith(field + ": ")
        reply = await call(app, "GET", "/openapi.json")
        assert reply.status == 200
        doc = reply.json()
        schemas = doc["components"]["schemas"]
        for path, model in (
            ("/v1/completions", "CompletionBody"),
            ("/v1/chat/completions", "ChatBody"),
        ):
            op = doc["paths"][path]["post"]
            ref = op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
            assert ref == f"#/components/schemas/{model}"
            assert schemas[model]["additionalProperties"] is False
            assert {"presence_penalty", "frequency_penalty", "n", "logit_bias"} <= set(
                schemas[model]["properties"]
            )
            assert op["responses"]["400"]["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }
            answers = op["responses"]
            assert set(answers["200"]["content"]) == {"application/json", "text/event-stream"}
            assert {"400", "401", "413", "429", "500", "503", "504"} <= set(answers)
        assert {"tools", "response_format", "messages"} <= set(schemas["ChatBody"]["properties"])
        # what a request must carry, and the bounds of the one sampling rule
        assert "prompt" in schemas["CompletionBody"]["required"]
        assert "messages" in schemas["ChatBody"]["required"]
        assert schemas["ChatBody"]["properties"]["messages"]["minItems"] == 1
        top_p = schemas["CompletionBody"]["properties"]["top_p"]
        assert (top_p["exclusiveMinimum"], top_p["maximum"]) == (0, 1)
        # a refused field's document lists the values that ask for nothing
        assert schemas["CompletionBody"]["properties"]["n"]["enum"] == [None, 1]
        assert schemas["ChatBody"]["properties"]["tools"]["enum"] == [None]
        assert "content" in schemas["ChatMessageBody"]["required"]
        metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
        assert set(metrics) == {"text/plain"}
        for name in ("ChatMessageBody", "TextPart", "StreamOptions", "Error"):
            assert name in schemas
        assert "$defs" not in json.dumps(doc)  # every reference resolves in components

    asyncio.run(run())
