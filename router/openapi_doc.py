"""The OpenAI app's OpenAPI document, as /openapi.json serves it.

FastAPI derives the routes from the app. The handlers read and bound their bodies
themselves and answer with JSON, server-sent events or Prometheus text, which FastAPI
cannot see; this module declares those: each request body's schema (the strict models
of `router.openai_schema`) and, per route, every status it answers with and in which
media types. The fuzz tests hold the live server to this document.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from pydantic import BaseModel

from router.errors import HTTP_STATUS, ErrorKind
from router.openai_schema import ChatBody, CompletionBody

_BODIES: dict[str, type[BaseModel]] = {
    "/v1/completions": CompletionBody,
    "/v1/chat/completions": ChatBody,
}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "enum": [k.value for k in ErrorKind]},
                "param": {"type": ["string", "null"]},
                "code": {"type": "null"},
            },
        }
    },
}
_COMPLETION_SCHEMA = {
    "type": "object",
    "required": ["id", "object", "created", "model", "choices"],
    "properties": {
        "id": {"type": "string"},
        "object": {"type": "string", "enum": ["text_completion", "chat.completion"]},
        "created": {"type": "integer"},
        "model": {"type": "string"},
        "choices": {"type": "array", "items": {"type": "object"}},
        "usage": {"type": "object"},
        "timings": {"type": "object"},
    },
}
# one server-sent event (OpenAPI 3.1 describes an event stream by its events)
_EVENT_SCHEMA = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": "a completion chunk or an error object as JSON, or [DONE]",
        }
    },
}
_HEALTH_SCHEMA = {
    "type": "object",
    "required": ["status"],
    "properties": {"status": {"type": "string", "enum": ["ok", "unavailable"]}},
}
_MODELS_SCHEMA = {
    "type": "object",
    "required": ["object", "data"],
    "properties": {"object": {"const": "list"}, "data": {"type": "array"}},
}

_ERROR = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
_ERROR_CASES = {
    ErrorKind.INVALID_ARGUMENT: "a bad field, named in error.param",
    ErrorKind.UNAUTHENTICATED: "missing or wrong API key",
    ErrorKind.RESOURCE_EXHAUSTED: "the router is full",
    ErrorKind.UNAVAILABLE: "no instance can take the request",
    ErrorKind.DEADLINE_EXCEEDED: "an instance did not answer in time",
    ErrorKind.INTERNAL: "the request failed inside the cluster",
}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _generation_answers() -> dict[str, Any]:
    answers: dict[str, Any] = {
        "200": {
            "description": "the completion; with stream=true, server-sent events ending "
            "in `data: [DONE]` (an error after the start is an `error` event)",
            "content": {
                **_json(_COMPLETION_SCHEMA),
                "text/event-stream": {"schema": _EVENT_SCHEMA},
            },
        },
        "413": {"description": "the body is too large", "content": _ERROR},
    }
    for kind, what in _ERROR_CASES.items():
        answers[str(HTTP_STATUS[kind])] = {"description": what, "content": _ERROR}
    return answers


def _answers() -> dict[tuple[str, str], dict[str, Any]]:
    unauthorized = {"description": "missing or wrong API key", "content": _ERROR}
    return {
        ("/health", "get"): {
            "200": {"description": "a decode instance is live", "content": _json(_HEALTH_SCHEMA)},
            "503": {"description": "no decode instance is live", "content": _json(_HEALTH_SCHEMA)},
        },
        ("/metrics", "get"): {
            "200": {
                "description": "Prometheus text format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            },
            "401": unauthorized,
        },
        ("/v1/models", "get"): {
            "200": {"description": "the served model", "content": _json(_MODELS_SCHEMA)},
            "401": unauthorized,
        },
        ("/v1/completions", "post"): _generation_answers(),
        ("/v1/chat/completions", "post"): _generation_answers(),
    }


def openapi_document(app: FastAPI) -> dict[str, Any]:
    """`app`'s document with the request bodies and answers above (built once)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = app.openapi()
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    schemas["Error"] = _ERROR_SCHEMA
    for path, model in _BODIES.items():
        schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
        schemas.update(schema.pop("$defs", {}))
        schemas[model.__name__] = schema
        ref = {"$ref": f"#/components/schemas/{model.__name__}"}
        doc["paths"][path]["post"]["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": ref}},
        }
    for (path, method), answers in _answers().items():
        doc["paths"][path][method]["responses"] = answers
    app.openapi_schema = doc
    return doc
