"""The OpenAI-compatible request bodies, and their translation to router requests.

The bodies are strict: a field OpenAI's API does not define is a 400 naming it. Every
field OpenAI documents for /v1/completions and /v1/chat/completions is declared, and
either honoured with its meaning or, when its value asks for something this server
does not do, refused by name (`n` > 1, `best_of` > 1, `echo`, `suffix`, `logit_bias`,
`tools` and functions, non-text `response_format`, audio, predictions, reasoning
options, web search, stored completions). A value that asks for nothing (`n: 1`,
`tool_choice: "none"`, `response_format: {"type": "text"}`, `store: false`, ...) is
accepted. `prompt_cache_key` is accepted as the hint it is: prompts are routed to the
instance that caches their prefix whatever the key. The role `developer` is `system`.
`top_k`, `stop_token_ids` and `ignore_eos` are accepted as in vLLM.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError
from pydantic.config import JsonDict

from router.validation import ChatMessageIn, InvalidRequest, RawRequest, RawSampling

# strict: a value of another JSON type is refused, never coerced ("5" is no integer,
# 0 no boolean)
_STRICT = ConfigDict(extra="forbid", strict=True)


def _integral(value: object) -> object:
    return int(value) if isinstance(value, float) and value.is_integer() else value


# JSON's integers: a number without a fraction, `2.0` as well as `2` (JSON Schema's
# meaning of "integer"), and never a string or a boolean
Integer = Annotated[int, BeforeValidator(_integral)]

# field -> (the values that ask for nothing, what a client gets told otherwise)
_Rules = dict[str, tuple[tuple[Any, ...], str]]

_COMMON_RULES: _Rules = {
    "n": ((None, 1), "only n=1 is supported"),
    "logit_bias": ((None, {}), "logit_bias is not supported"),
}
_COMPLETION_RULES: _Rules = {
    "best_of": ((None, 1), "only best_of=1 is supported"),
    "echo": ((None, False), "echo is not supported"),
    "suffix": ((None, ""), "suffix is not supported"),
}
_CHAT_RULES: _Rules = {
    "tools": ((None,), "tools are not supported"),
    "tool_choice": ((None, "none"), "tools are not supported; only 'none' is accepted"),
    "parallel_tool_calls": ((None,), "tools are not supported"),
    "functions": ((None,), "functions are not supported"),
    "function_call": ((None, "none"), "functions are not supported; only 'none' is accepted"),
    "response_format": ((None, {"type": "text"}), "only the text response format is supported"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "only the text modality is supported"),
    "prediction": ((None,), "predicted outputs are not supported"),
    "reasoning_effort": ((None,), "this model has no reasoning options"),
    "verbosity": ((None,), "verbosity is not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "store": ((None, False), "completions are not stored"),
    "metadata": ((None, {}), "metadata is kept only with stored completions, which are not"),
    "service_tier": ((None, "auto", "default"), "only the default service tier exists"),
}


def _check(body: BaseModel, rules: _Rules) -> None:
    for name, (noops, why) in rules.items():
        if getattr(body, name) not in noops:
            raise InvalidRequest(name, why)


def _only(noops: dict[str, tuple[Any, ...]], required: tuple[str, ...] = ()) -> ConfigDict:
    """The strict config, and a JSON schema that says which values of the refused
    fields are accepted (the ones that ask for nothing) and which fields must be there
    and not null, so that /openapi.json describes what the server takes."""

    def document(schema: JsonDict) -> None:
        props: Any = schema["properties"]
        for name, values in noops.items():
            props[name]["enum"] = list(values)
        for name in required:
            prop = props[name]
            prop.pop("default", None)
            prop["anyOf"] = [x for x in prop["anyOf"] if x != {"type": "null"}]
            listed: Any = schema.get("required", [])
            schema["required"] = [*listed, name]

    return ConfigDict(extra="forbid", strict=True, json_schema_extra=document)


def _noops(*rules: _Rules) -> dict[str, tuple[Any, ...]]:
    return {name: noops for r in rules for name, (noops, _) in r.items()}


class StreamOptions(BaseModel):
    model_config = _only({"include_obfuscation": (None, False)})

    include_usage: bool = False
    include_obfuscation: bool | None = None

    def check(self) -> None:
        if self.include_obfuscation:
            raise InvalidRequest("stream_options.include_obfuscation", "is not supported")


def _bounded(**bounds: float) -> Any:
    """An optional field whose static bounds the OpenAPI document states; the one
    sampling rule (`SamplingParams.validate`) enforces them, with its messages."""
    extra: JsonDict = dict(bounds)
    return Field(default=None, json_schema_extra=extra)


class _Body(BaseModel):
    model_config = _STRICT

    model: str = ""
    max_tokens: Integer | None = _bounded(minimum=1)
    temperature: float | None = _bounded(minimum=0)
    top_p: float | None = _bounded(exclusiveMinimum=0, maximum=1)
    top_k: Integer | None = _bounded(minimum=-1)
    stop: str | list[str] | None = None
    stop_token_ids: list[Integer] | None = None
    ignore_eos: bool = False
    seed: Integer | None = _bounded(minimum=0, maximum=2**63 - 1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str = ""
    n: Integer | None = None
    presence_penalty: float | None = _bounded(minimum=-2, maximum=2)
    frequency_penalty: float | None = _bounded(minimum=-2, maximum=2)
    logit_bias: dict[str, float] | None = None

    def _common_checks(self) -> None:
        _check(self, _COMMON_RULES)
        if self.stream_options is not None:
            self.stream_options.check()

    def _sampling(self, max_tokens: int | None, logprobs: int | None) -> RawSampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return RawSampling(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=self.top_k,
            max_tokens=max_tokens,
            stop=tuple(stop),
            stop_token_ids=tuple(self.stop_token_ids or ()),
            ignore_eos=self.ignore_eos,
            seed=self.seed,
            logprobs=logprobs,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
        )

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionBody(_Body):
    model_config = _only(_noops(_COMMON_RULES, _COMPLETION_RULES))

    prompt: str | list[Integer]
    logprobs: Integer | None = _bounded(minimum=0)
    echo: bool | None = None
    best_of: Integer | None = None
    suffix: str | None = None

    def to_raw(self) -> RawRequest:
        self._common_checks()
        _check(self, _COMPLETION_RULES)
        text = self.prompt if isinstance(self.prompt, str) else None
        ids = tuple(self.prompt) if isinstance(self.prompt, list) else None
        return RawRequest(
            prompt=text,
            token_ids=ids,
            sampling=self._sampling(self.max_tokens, self.logprobs),
            model=self.model,
            client_tag=self.user,
        )


class TextPart(BaseModel):
    model_config = _STRICT

    type: Literal["text"]
    text: str


_MESSAGE_REFUSED = ("name", "tool_calls", "tool_call_id", "function_call", "audio", "refusal")


class ChatMessageBody(BaseModel):
    model_config = _only({name: (None,) for name in _MESSAGE_REFUSED}, required=("content",))

    # the roles the chat template takes (`developer` is `system`), checked with it
    role: str = Field(
        json_schema_extra={"enum": ["system", "developer", "user", "assistant", "tool"]}
    )
    content: str | list[TextPart] | None = None
    name: str | None = None
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    tool_call_id: str | None = None
    function_call: Any = None
    audio: Any = None

    def to_message(self, i: int) -> ChatMessageIn:
        for name in _MESSAGE_REFUSED:
            if getattr(self, name) is not None:
                raise InvalidRequest(f"messages[{i}].{name}", "is not supported")
        if self.content is None:
            raise InvalidRequest(f"messages[{i}].content", "is required")
        text = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        return ChatMessageIn("system" if self.role == "developer" else self.role, text)


class ChatBody(_Body):
    model_config = _only(_noops(_COMMON_RULES, _CHAT_RULES))

    messages: list[ChatMessageBody] = Field(min_length=1)
    max_completion_tokens: Integer | None = _bounded(minimum=1)
    logprobs: bool = False
    top_logprobs: Integer | None = _bounded(minimum=0)
    tools: list[Any] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    functions: list[Any] | None = None
    function_call: Any = None
    response_format: dict[str, Any] | None = None
    audio: Any = None
    modalities: list[str] | None = None
    prediction: Any = None
    reasoning_effort: str | None = None
    verbosity: str | None = None
    web_search_options: Any = None
    store: bool | None = None
    metadata: dict[str, str] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None

    def to_raw(self, default_max_tokens: int) -> RawRequest:
        self._common_checks()
        _check(self, _CHAT_RULES)
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        if self.user and self.safety_identifier:
            raise InvalidRequest("safety_identifier", "set it or user, not both")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise InvalidRequest("max_tokens", "set it or max_completion_tokens, not both")
        n_logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        return RawRequest(
            messages=tuple(m.to_message(i) for i, m in enumerate(self.messages)),
            sampling=self._sampling(max_tokens, n_logprobs),
            model=self.model,
            client_tag=self.user or self.safety_identifier or "",
            default_max_tokens=default_max_tokens,
        )


_UNION_TAGS = frozenset(
    {"str", "int", "float", "bool", "list", "function-after", "function-before"}
)


def first_error(e: ValidationError) -> InvalidRequest:
    """A body's first schema error, as an InvalidRequest naming the field's path; a
    field the request does not have is named before a missing one."""
    errors = e.errors()
    err = next((x for x in errors if x.get("type") == "extra_forbidden"), errors[0])
    path = ""
    for part in err.get("loc", ()):
        if isinstance(part, str) and (
            part in _UNION_TAGS or "[" in part or part[:1].isupper() or part.startswith("list")
        ):
            continue  # which member of a union failed, not a field
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    if err.get("type") == "extra_forbidden":
        return InvalidRequest(path or "body", "is not a field of this request")
    return InvalidRequest(path or "body", err.get("msg", "invalid value"))
