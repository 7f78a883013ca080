"""Building a Redis client for the registry, with timeouts on every call.

A registry call must never hang a worker: `connect` sets a socket timeout for
connecting and for each reply, and a small, bounded retry budget (redis-py's own
default retries ten times). `socket_timeout_of` lets other code check that a client
it was handed has a timeout.
"""

from __future__ import annotations

import redis
from redis.backoff import ExponentialWithJitterBackoff
from redis.retry import Retry

DEFAULT_SOCKET_TIMEOUT_S = 2.0
DEFAULT_RETRIES = 2


def connect(
    url: str,
    *,
    socket_timeout_s: float = DEFAULT_SOCKET_TIMEOUT_S,
    retries: int = DEFAULT_RETRIES,
    client_name: str | None = None,
) -> redis.Redis:
    """A sync client that decodes replies to str and speaks RESP2 (stable reply shapes).
    One call blocks at most about `socket_timeout_s * (retries + 1)` plus backoff."""
    if socket_timeout_s <= 0:
        raise ValueError("socket_timeout_s must be positive")
    if retries < 0:
        raise ValueError("retries must be >= 0")
    return redis.Redis.from_url(
        url,
        socket_timeout=socket_timeout_s,
        socket_connect_timeout=socket_timeout_s,
        retry=Retry(ExponentialWithJitterBackoff(cap=0.5, base=0.02), retries),
        decode_responses=True,
        protocol=2,
        client_name=client_name,
    )


def socket_timeout_of(client: redis.Redis) -> float | None:
    timeout = client.connection_pool.connection_kwargs.get("socket_timeout")
    return float(timeout) if timeout is not None else None


def require_timeout(client: redis.Redis) -> float:
    """The client's socket timeout; raises if it has none (a call could block forever)."""
    timeout = socket_timeout_of(client)
    if timeout is None or timeout <= 0:
        raise ValueError(
            "the registry needs a Redis client with a socket timeout; use registry.connect"
        )
    return timeout


def text(value: bytes | str) -> str:
    """A reply element as str, whether or not the client decodes responses."""
    return value.decode() if isinstance(value, bytes) else value
