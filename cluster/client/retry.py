"""When the clients call Generate again: UNAVAILABLE before the first chunk.

A Generate that fails with UNAVAILABLE before any chunk reached the client produced
nothing the client saw (a router replica died, which Serve's proxy reports as INTERNAL
with Ray's actor error and the client reads as UNAVAILABLE, or the proxy had no replica
to send it to), so sending the same request again is idempotent: the server assigns its own ids
to every call. Once a chunk arrived the error goes to the caller, since a second call
would repeat text the caller already has. Tries are bounded (`max_retries`), spaced by
a short doubling backoff, and never outlast the call's own deadline; each one is
counted in the client's `retries`.

Both clients' resend loops drive a `Tries` for each Generate, which holds these
decisions; the loops differ only in how they read the stream and sleep.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import grpc

from cluster.client.messages import error_from

DEFAULT_MAX_RETRIES = 2
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = DEFAULT_MAX_RETRIES
    backoff_s: float = 0.1  # before the first retry; doubles, capped at `max_backoff_s`
    max_backoff_s: float = 1.0

    def __post_init__(self) -> None:
        if not 0 <= self.max_retries <= 16:
            raise ValueError(f"max_retries must be in [0, 16], got {self.max_retries}")
        if self.backoff_s < 0 or self.max_backoff_s < self.backoff_s:
            raise ValueError("backoff_s must be >= 0 and <= max_backoff_s")

    def delay(self, code: grpc.StatusCode, started: bool, attempt: int, left_s: float) -> float:
        """Seconds to wait before try `attempt + 1` (the first try is 0), or -1 when the
        error must go to the caller."""
        if started or code not in RETRYABLE or attempt >= self.max_retries:
            return -1.0
        wait = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        return wait if wait < left_s else -1.0


class Tries:
    """The tries of one Generate under `policy`, within `timeout_s` in all."""

    def __init__(self, policy: RetryPolicy, timeout_s: float) -> None:
        self._policy = policy
        self._deadline = time.monotonic() + timeout_s
        self._attempt = 0  # the tries that failed so far

    def left_s(self) -> float:
        """The next call's timeout: what is left of the deadline."""
        return max(0.0, self._deadline - time.monotonic())

    def after_failure(self, e: grpc.RpcError, started: bool) -> float:
        """Seconds to wait before sending the request again after the try that failed
        with `e` (`started`: a chunk of it reached the caller); raises the call's
        `ClientError` when the error goes to the caller instead. Call it in the `except`
        block that caught `e`."""
        error = error_from(e)
        left_s = self._deadline - time.monotonic()
        wait = self._policy.delay(error.code, started, self._attempt, left_s)
        if wait < 0:
            raise error from None
        self._attempt += 1
        return wait
