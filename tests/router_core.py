"""Settings for a real RouterCore (tokenizer, validator, Redis-backed cluster view,
metrics) over a Redis with no instances registered: requests are checked, tokenized
and then find no decode instance (UNAVAILABLE), so nothing ever reaches a pool."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

from registry import Role
from router.dispatch import DispatchTimeouts
from router.settings import PoolSpec, RouterSettings
from router.validation import Limits

CORE_MAX_LEN = 64


class UnreachablePool:
    """Stands where a pool's handle goes; the requests of these tests never get that
    far, and a call fails the test."""

    def options(self, **_: Any) -> UnreachablePool:
        return self

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"a request reached the pool ({name})")


def core_settings(model_dir: Path, redis_url: str, **changes: Any) -> RouterSettings:
    fields: dict[str, Any] = {
        "cluster": f"t-core-{uuid.uuid4().hex[:8]}",
        "served_model": "tiny",
        "model_dir": str(model_dir),
        "max_model_len": CORE_MAX_LEN,
        "block_size": 16,
        "redis_url": redis_url,
        "lease_ttl_s": 5.0,
        "pools": (PoolSpec("decode", Role.COLOCATED, 1, 1, 1),),
        "disaggregation_threshold": 64,
        "limits": Limits(
            max_model_len=CORE_MAX_LEN,
            max_prompt_tokens=CORE_MAX_LEN - 1,
            max_prompt_chars=16 * (CORE_MAX_LEN - 1),
            max_messages=8,
        ),
        "timeouts": DispatchTimeouts(1.0, 1.0, 1.0, 1.0),
        "max_inflight_requests": 4,
        "max_request_bytes": 4 << 20,  # above a 1 MiB prompt: the prompt bound decides
        "view_refresh_interval_s": 0.2,
        "default_chat_max_tokens": 8,
    }
    fields.update(changes)
    return RouterSettings(**fields)


class CallContext:
    """The parts of a gRPC servicer context the front end uses."""

    def __init__(self, metadata: tuple[tuple[str, str], ...] = ()) -> None:
        self.code: Any = None
        self.details = ""
        self._metadata = metadata
        self.trailing: list[tuple[str, str]] = []

    def set_code(self, code: Any) -> None:
        self.code = code

    def set_details(self, details: str) -> None:
        self.details = details

    def invocation_metadata(self) -> tuple[tuple[str, str], ...]:
        return self._metadata

    def set_trailing_metadata(self, metadata: list[tuple[str, str]]) -> None:
        self.trailing = list(metadata)
