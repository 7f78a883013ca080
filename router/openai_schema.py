"""The OpenAI-compatible request bodies, and their translation to router requests.

Unknown fields are ignored, as OpenAI clients send many; fields whose values the
router cannot honour (n > 1, echo, best_of) are rejected by name. `top_k`,
`stop_token_ids` and `ignore_eos` are accepted as in vLLM.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from router.validation import ChatMessageIn, InvalidRequest, RawRequest, RawSampling


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    seed: int | None = None
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str = ""
    n: int = 1

    def _common_checks(self) -> None:
        if self.n != 1:
            raise InvalidRequest("n", "only n=1 is supported")

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
        )

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class CompletionBody(_Body):
    prompt: str | list[int] | None = None
    logprobs: int | None = None
    echo: bool = False

    def to_raw(self) -> RawRequest:
        self._common_checks()
        if self.echo:
            raise InvalidRequest("echo", "echo is not supported")
        if self.prompt is None:
            raise InvalidRequest("prompt", "is required")
        text = self.prompt if isinstance(self.prompt, str) else None
        ids = tuple(self.prompt) if isinstance(self.prompt, list) else None
        return RawRequest(
            prompt=text,
            token_ids=ids,
            sampling=self._sampling(self.max_tokens, self.logprobs),
            model=self.model,
            client_tag=self.user,
        )


class ChatMessageBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str


class ChatBody(_Body):
    messages: list[ChatMessageBody] = Field(default_factory=list)
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None

    def to_raw(self, default_max_tokens: int) -> RawRequest:
        self._common_checks()
        if self.top_logprobs is not None and not self.logprobs:
            raise InvalidRequest("top_logprobs", "needs logprobs: true")
        n_logprobs = (self.top_logprobs or 0) if self.logprobs else None
        max_tokens = (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )
        return RawRequest(
            messages=tuple(ChatMessageIn(m.role, m.content) for m in self.messages),
            sampling=self._sampling(max_tokens, n_logprobs),
            model=self.model,
            client_tag=self.user,
            default_max_tokens=default_max_tokens,
        )


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "function-after", "function-before"})


def first_error(e: ValidationError) -> InvalidRequest:
    """A body's first schema error, as an InvalidRequest naming the field's path."""
    err = e.errors()[0]
    path = ""
    for part in err.get("loc", ()):
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part):
            continue  # which member of a union failed, not a field
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return InvalidRequest(path or "body", err.get("msg", "invalid value"))
