"""When the clients call Generate again: UNAVAILABLE before the first chunk (a retry),
or after some chunks arrived (a resume).

A Generate that fails with UNAVAILABLE before any chunk reached the client produced
nothing the client saw (a router replica died, which Serve's proxy reports as INTERNAL
with Ray's actor error and the client reads as UNAVAILABLE, or the proxy had no replica
to send it to), so sending the same request again is idempotent: the server assigns its
own ids to every call. Tries are bounded (`max_retries`), spaced by a short doubling
backoff, and never outlast the call's own deadline; each one is counted in the
client's `retries`.

A stream that breaks with UNAVAILABLE after some chunks arrived (the router replica
carrying it died) is continued: the request goes out again with the tokens and the
characters of text received so far as its `resume` field, and the server streams on
from the next token, so the caller's iterator goes on with no token repeated or
missing (greedy output is the undisturbed run's). Each such call is a resume
(`max_resumes`, counted in the client's `resumes`); before its own first chunk it is
retried like any call. A stream whose last chunk arrived is never continued.

Both clients' resend loops drive a `StreamCalls` for each Generate, which holds these
decisions; the loops differ only in how they read the stream and sleep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from cluster.client.messages import Chunk, ClientError
from protos.pdserve.v1 import pdserve_pb2

DEFAULT_MAX_RETRIES = 2
DEFAULT_MAX_RESUMES = 2
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_s: float = 0.1  # before the first retry; doubles, capped at `max_backoff_s`
    max_backoff_s: float = 1.0
    max_resumes: int = DEFAULT_MAX_RESUMES  # continuations of one stream that broke

    def __post_init__(self) -> None:
        if not 0 <= self.max_retries <= 16:
            raise ValueError(f"max_retries must be in [0, 16], got {self.max_retries}")
        if not 0 <= self.max_resumes <= 16:
            raise ValueError(f"max_resumes must be in [0, 16], got {self.max_resumes}")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("backoff_s must be >= 0 and <= max_backoff_s")

    def delay(self, code: grpc.StatusCode, started: bool, attempt: int, left_s: float) -> float:
        """Seconds to wait before try `attempt + 1` (the first try is 0), or -1 when the
        error must go to the caller."""
        if started or code not in RETRYABLE or attempt >= self.max_retries:
            return -1.0
        wait = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return wait if wait < left_s else -1.0

    def resume_delay(self, code: grpc.StatusCode, resumes: int, left_s: float) -> float:
        """Seconds to wait before continuing a stream that broke after `resumes`
        continuations, or -1 when the error must go to the caller."""
        if code not in RETRYABLE or resumes >= self.max_resumes:
            return -1.0
        return self.backoff_s if self.backoff_s < left_s else -1.0


class StreamCalls:
    """One stream over its calls: what the caller has of it, the request that
    continues it, and whether and when the next call goes out."""

    def __init__(
        self, request: pdserve_pb2.GenerateRequest, policy: RetryPolicy, timeout_s: float
    ) -> None:
        self._request = request  # the current call's: the caller's, or a continuation
        self._policy = policy
        self.deadline = time.monotonic() + timeout_s
        given = request.resume if request.HasField("resume") else None
        self.token_ids: list[int] = list(given.token_ids) if given is not None else []
        self.text_chars = given.text_chars if given is not None else 0
        self._sent = len(self.token_ids)  # tokens the current call's request holds
        self._attempt = 0  # tries of the current call
        self._resumes = 0
        self._started = False  # the current call streamed a chunk
        self._finished = False

    def request(self) -> pdserve_pb2.GenerateRequest:
        """The next call's request: the caller's own, or its continuation."""
        self._started = False
        if len(self.token_ids) != self._sent:
            req = pdserve_pb2.GenerateRequest()
            req.CopyFrom(self._request)
            req.resume.token_ids[:] = self.token_ids
            req.resume.text_chars = self.text_chars
            self._request, self._sent = req, len(self.token_ids)
        return self._request

    def timeout(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    def took(self, chunk: Chunk) -> Chunk:
        self._started = True
        self.token_ids.extend(chunk.token_ids)
        self.text_chars += len(chunk.text)
        self._finished = self._finished or chunk.finish_reason is not None
        return chunk

    def after(self, error: ClientError) -> tuple[str, float]:
        """("retry" or "resume", seconds to wait) for the call that failed with
        `error`; raises it when it goes to the caller."""
        left = self.deadline - time.monotonic()
        if not self._started:
            wait = self._policy.delay(error.code, False, self._attempt, left)
            self._attempt += 1
            kind = "retry"
        elif self._finished or not self.token_ids:
            wait = -1.0
        else:
            wait = self._policy.resume_delay(error.code, self._resumes, left)
            self._resumes += 1
            self._attempt = 0  # the continuation's own tries before its first chunk
            kind = "resume"
        if wait < 0:
            raise error from None
        return kind, wait
