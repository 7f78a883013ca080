"""Request validation: every field bounded, every error naming its field.

Both front ends (gRPC and the OpenAI HTTP API) turn their request into a `RawRequest`
and call `RequestValidator.validate` with their own `FieldNames`, so the same rule
reports `sampling.top_p` over gRPC and `top_p` over HTTP. Validation is side-effect
free and runs before anything is routed; the worker's engine validates again.

Two steps. `check` is cheap and bounded, and runs on the event loop: model, tag,
exactly one input, sampling values, and the input's size in characters, messages or
token ids, so a huge prompt is refused before any tokenizing. `finish` tokenizes (the
chat template included) and applies the token-count limits: prompt below the context
length and `prompt + max_tokens` within it; the router runs it in a thread pool, never
on the event loop. `validate` does both, for callers without a loop.

A resumed request (`resume`: a broken stream that the client continues) is bounded the
same way: its token ids in `check` (at most the context length, each in the
vocabulary), then in `finish` fewer than max_tokens, and its characters of text at
most what those tokens decode to after the prompt.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine import Resume, SamplingParams
from engine.sampling import SamplingError
from engine.tokenizer import IncrementalDetokenizer
from router.tokenization import PromptEncoder


class InvalidRequest(ValueError):
    """A client error; `field` is the protocol's name for the offending field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


@dataclass(frozen=True)
class FieldNames:
    input: str
    prompt: str
    token_ids: str
    messages: str
    temperature: str
    top_p: str
    top_k: str
    max_tokens: str
    stop: str
    stop_token_ids: str
    seed: str
    logprobs: str
    presence_penalty: str
    frequency_penalty: str
    client_tag: str
    model: str
    resume: str

    def of(self, sampling_field: str) -> str:
        """The protocol's name for a `SamplingError` field (`stop[2]` and the like)."""
        name, bracket, index = sampling_field.partition("[")
        return str(getattr(self, name)) + bracket + index


PROTO_FIELDS = FieldNames(
    input="input",
    prompt="prompt",
    token_ids="token_ids.ids",
    messages="chat.messages",
    temperature="sampling.temperature",
    top_p="sampling.top_p",
    top_k="sampling.top_k",
    max_tokens="sampling.max_tokens",
    stop="sampling.stop",
    stop_token_ids="sampling.stop_token_ids",
    seed="sampling.seed",
    logprobs="sampling.logprobs",
    presence_penalty="sampling.presence_penalty",
    frequency_penalty="sampling.frequency_penalty",
    client_tag="client_tag",
    model="model",
    resume="resume",
)

OPENAI_FIELDS = FieldNames(
    input="prompt",
    prompt="prompt",
    token_ids="prompt",
    messages="messages",
    temperature="temperature",
    top_p="top_p",
    top_k="top_k",
    max_tokens="max_tokens",
    stop="stop",
    stop_token_ids="stop_token_ids",
    seed="seed",
    logprobs="logprobs",
    presence_penalty="presence_penalty",
    frequency_penalty="frequency_penalty",
    client_tag="user",
    model="model",
    resume="resume",  # not in the HTTP API
)


@dataclass(frozen=True)
class ChatMessageIn:
    role: str
    content: str


@dataclass(frozen=True)
class RawSampling:
    """Sampling fields as the client sent them; None means unset."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


@dataclass(frozen=True)
class RawRequest:
    prompt: str | None = None
    token_ids: tuple[int, ...] | None = None
    messages: tuple[ChatMessageIn, ...] | None = None
    sampling: RawSampling = RawSampling()
    model: str = ""
    client_tag: str = ""
    # max_tokens when unset; None: the engine's default of 16. Either way it is cut to
    # what the context has left.
    default_max_tokens: int | None = None
    resume: Resume | None = None  # a broken stream's tokens and text, to continue


@dataclass(frozen=True)
class Limits:
    max_model_len: int
    max_prompt_tokens: int
    # Characters of prompt text (or of all chat messages, roles included) before any
    # tokenizing; the builder derives it from max_prompt_tokens.
    max_prompt_chars: int = 1 << 20
    max_messages: int = 1024
    max_stop_strings: int = 16
    max_stop_string_chars: int = 256
    max_stop_token_ids: int = 64
    max_logprobs: int = 20
    max_client_tag_chars: int = 128

    def __post_init__(self) -> None:
        if not 1 <= self.max_prompt_tokens < self.max_model_len:
            raise ValueError("max_prompt_tokens: must be in [1, max_model_len)")
        if min(self.max_prompt_chars, self.max_messages) < 1:
            raise ValueError("max_prompt_chars and max_messages must be >= 1")


@dataclass(frozen=True)
class CheckedRequest:
    """A request whose cheap checks passed: bounded in size, not yet tokenized."""

    raw: RawRequest
    params: SamplingParams


@dataclass(frozen=True)
class ValidRequest:
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    client_tag: str
    resume: Resume | None = None  # the client continues a broken stream after these


_ENGINE_DEFAULT_MAX_TOKENS = 16


class RequestValidator:
    def __init__(self, limits: Limits, encoder: PromptEncoder, served_model: str) -> None:
        self.limits = limits
        self.encoder = encoder
        self.served_model = served_model

    def validate(self, raw: RawRequest, names: FieldNames) -> ValidRequest:
        return self.finish(self.check(raw, names), names)

    def check(self, raw: RawRequest, names: FieldNames) -> CheckedRequest:
        """Everything but tokenizing: cheap, bounded by the request's size."""
        lim = self.limits
        if raw.model and raw.model != self.served_model:
            raise InvalidRequest(
                names.model,
                f"unknown model {raw.model!r}; this cluster serves {self.served_model!r}",
            )
        if len(raw.client_tag) > lim.max_client_tag_chars:
            raise InvalidRequest(names.client_tag, f"at most {lim.max_client_tag_chars} characters")
        given = [x for x in (raw.prompt, raw.token_ids, raw.messages) if x is not None]
        if len(given) != 1:
            raise InvalidRequest(
                names.input, "exactly one of prompt, token ids or messages is required"
            )
        params = self._check_sampling(raw.sampling, names)
        self._check_input_size(raw, names)
        if raw.resume is not None:
            self._check_resume(raw.resume, names.resume)
        return CheckedRequest(raw, params)

    def _check_resume(self, resume: Resume, field: str) -> None:
        ids = resume.output_token_ids
        if not ids:
            raise InvalidRequest(f"{field}.token_ids", "must not be empty")
        if len(ids) >= self.limits.max_model_len:
            raise InvalidRequest(
                f"{field}.token_ids",
                f"{len(ids)} tokens; at most {self.limits.max_model_len - 1} are allowed",
            )
        vocab = self.encoder.vocab_size
        for i, tok in enumerate(ids):
            if not 0 <= tok < vocab:
                raise InvalidRequest(f"{field}.token_ids[{i}]", f"{tok} is outside [0, {vocab})")

    def finish(self, checked: CheckedRequest, names: FieldNames) -> ValidRequest:
        """Tokenizes a checked request and applies the token-count limits."""
        lim = self.limits
        raw = checked.raw
        prompt, field = self._tokenize(raw, names)
        n = len(prompt)
        if n == 0:
            raise InvalidRequest(field, "the prompt must not be empty")
        limit = min(lim.max_prompt_tokens, lim.max_model_len - 1)
        if n > limit:
            raise InvalidRequest(
                field,
                f"the prompt is {n} tokens; at most {limit} are allowed "
                f"(max_model_len {lim.max_model_len} holds the prompt and the output)",
            )
        room = lim.max_model_len - n
        s = raw.sampling
        if s.max_tokens is None:
            max_tokens = min(raw.default_max_tokens or _ENGINE_DEFAULT_MAX_TOKENS, room)
        elif s.max_tokens > room:
            raise InvalidRequest(
                names.max_tokens,
                f"prompt ({n} tokens) plus max_tokens ({s.max_tokens}) exceeds the "
                f"context length {lim.max_model_len}; at most {room} more tokens fit",
            )
        else:
            max_tokens = s.max_tokens
        params = dataclasses.replace(checked.params, max_tokens=max_tokens)
        if raw.resume is not None:
            self._finish_resume(raw.resume, prompt, params, names.resume)
        return ValidRequest(tuple(prompt), params, raw.client_tag, raw.resume)

    def _finish_resume(
        self, resume: Resume, prompt: list[int], params: SamplingParams, field: str
    ) -> None:
        """Fewer resumed tokens than max_tokens, and no more text than they make."""
        n = len(resume.output_token_ids)
        if n >= params.max_tokens:
            raise InvalidRequest(
                f"{field}.token_ids",
                f"{n} tokens leave none of max_tokens ({params.max_tokens}) to generate",
            )
        detok = IncrementalDetokenizer(self.encoder.tokenizer, prompt, params.stop)
        for tok in resume.output_token_ids:
            detok.push(tok)
        if resume.text_chars_sent > len(detok.text):
            raise InvalidRequest(
                f"{field}.text_chars",
                f"{resume.text_chars_sent}; those tokens make {len(detok.text)} characters",
            )

    def _check_sampling(self, s: RawSampling, names: FieldNames) -> SamplingParams:
        """The request's sampling, checked by the engine's rule (`SamplingParams.validate`)
        under this router's limits; max_tokens is settled once the prompt is known."""
        lim = self.limits
        params = SamplingParams(
            temperature=1.0 if s.temperature is None else s.temperature,
            top_p=1.0 if s.top_p is None else s.top_p,
            top_k=-1 if s.top_k is None else s.top_k,
            max_tokens=1 if s.max_tokens is None else s.max_tokens,
            stop=list(s.stop),
            stop_token_ids=list(s.stop_token_ids),
            ignore_eos=s.ignore_eos,
            seed=s.seed,
            logprobs=s.logprobs,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
        )
        try:
            params.validate(
                self.encoder.vocab_size,
                max_stop_strings=lim.max_stop_strings,
                max_logprobs=lim.max_logprobs,
                max_stop_string_chars=lim.max_stop_string_chars,
                max_stop_token_ids=lim.max_stop_token_ids,
            )
        except SamplingError as e:
            raise InvalidRequest(names.of(e.field), e.message) from None
        return params

    def _check_input_size(self, raw: RawRequest, names: FieldNames) -> None:
        lim = self.limits
        if raw.prompt is not None:
            if not raw.prompt:
                raise InvalidRequest(names.prompt, "the prompt must not be empty")
            if len(raw.prompt) > lim.max_prompt_chars:
                raise InvalidRequest(
                    names.prompt,
                    f"{len(raw.prompt)} characters; at most {lim.max_prompt_chars} are allowed",
                )
        elif raw.token_ids is not None:
            given = raw.token_ids
            if len(given) > lim.max_prompt_tokens:
                raise InvalidRequest(names.token_ids, f"at most {lim.max_prompt_tokens} tokens")
            vocab = self.encoder.vocab_size
            for i, tok in enumerate(given):
                if not 0 <= tok < vocab:
                    raise InvalidRequest(
                        f"{names.token_ids}[{i}]", f"{tok} is outside [0, {vocab})"
                    )
        else:
            messages = raw.messages or ()
            if not messages:
                raise InvalidRequest(names.messages, "must not be empty")
            if len(messages) > lim.max_messages:
                raise InvalidRequest(
                    names.messages,
                    f"{len(messages)} messages; at most {lim.max_messages} are allowed",
                )
            chars = sum(len(m.role) + len(m.content) for m in messages)
            if chars > lim.max_prompt_chars:
                raise InvalidRequest(
                    names.messages,
                    f"{chars} characters in all; at most {lim.max_prompt_chars} are allowed",
                )

    def _tokenize(self, raw: RawRequest, names: FieldNames) -> tuple[list[int], str]:
        if raw.prompt is not None:
            return self.encoder.encode(raw.prompt), names.prompt
        if raw.token_ids is not None:
            return list(raw.token_ids), names.token_ids
        messages = raw.messages or ()
        try:
            ids = self.encoder.chat([{"role": m.role, "content": m.content} for m in messages])
        except ValueError as e:
            text = str(e)
            # The tokenizer names `messages[i].field`; put the protocol's path in front.
            if text.startswith("messages"):
                raise InvalidRequest(
                    names.messages + text[len("messages") :].split(" ", 1)[0],
                    text.split(" ", 1)[1] if " " in text else text,
                ) from None
            raise InvalidRequest(names.messages, text) from None
        return ids, names.messages
