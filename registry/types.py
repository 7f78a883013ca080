"""Typed values that cross the registry boundary, and their JSON encoding.

Every value is a frozen pydantic dataclass, validated when it is built and when it is
read back from Redis, so a malformed entry fails loudly at the boundary instead of
deep in a routing decision. The wire format is plain JSON (never pickle); readers
ignore unknown fields so a newer writer does not break an older reader.
"""

from __future__ import annotations

import time
import uuid
from enum import StrEnum
from typing import Annotated, Generic, TypeVar

from pydantic import ConfigDict, Field, TypeAdapter
from pydantic.dataclasses import dataclass

# Names used inside Redis keys: no ':' (the key separator), no glob characters.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
Name = Annotated[str, Field(pattern=NAME_PATTERN)]
NonNegInt = Annotated[int, Field(ge=0)]
PosInt = Annotated[int, Field(ge=1)]
BlockHash = Annotated[int, Field(ge=0, lt=2**64)]

_CONFIG = ConfigDict(strict=True, extra="ignore")


class Role(StrEnum):
    """What a pool does, and so each of its instances. In the registry an instance
    records the requests it takes: a colocated instance takes decode requests, so it
    registers as DECODE (`routing_role`)."""

    PREFILL = "prefill"  # computes prompts and pushes their KV to a decode instance
    DECODE = "decode"  # receives KV from a prefill pool; prefills short prompts itself
    COLOCATED = "colocated"  # prefills every prompt itself

    @property
    def routing_role(self) -> Role:
        """The role an instance of this pool registers under."""
        return Role.PREFILL if self is Role.PREFILL else Role.DECODE


@dataclass(frozen=True, config=_CONFIG)
class InstanceInfo:
    """What an instance advertises while its lease is live."""

    instance_id: Name
    pool: Name
    role: Role
    # How peers reach it (a Ray actor name or host:port); empty when not reachable.
    address: str = ""
    tp: PosInt = 1
    pp: PosInt = 1
    # Tokens per KV block; the router hashes prompts with the same size.
    block_size: PosInt = 16
    # Serves both prefill and decode requests: the routing table (`registry.routing`)
    # may give it the other role than `role`, its pool's.
    switchable: bool = False


@dataclass(frozen=True, config=_CONFIG)
class LoadReport:
    """One instance's load at wall-clock time `ts` (seconds since the epoch)."""

    queued_prefill_tokens: NonNegInt
    running_seqs: NonNegInt
    free_kv_blocks: NonNegInt
    total_kv_blocks: NonNegInt
    ts: Annotated[float, Field(ge=0)] = Field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.free_kv_blocks > self.total_kv_blocks:
            raise ValueError(
                f"free_kv_blocks ({self.free_kv_blocks}) exceeds "
                f"total_kv_blocks ({self.total_kv_blocks})"
            )


class PrefixOp(StrEnum):
    ADD = "add"
    EVICT = "evict"
    # The instance left (deregistered or its lease expired): drop all its hashes.
    CLEAR = "clear"


@dataclass(frozen=True, config=_CONFIG)
class PrefixEvent:
    """One entry of the prefix-block event stream, in stream order."""

    event_id: str
    instance_id: Name
    op: PrefixOp
    block_hashes: tuple[BlockHash, ...] = ()


@dataclass(frozen=True, config=_CONFIG)
class PrefixSnapshot:
    """Every instance's block hashes, consistent with the stream up to `last_event_id`
    ("0-0" when the stream is empty). Follow the stream from there."""

    last_event_id: str
    blocks: dict[str, frozenset[int]]


def new_instance_id(pool: str) -> str:
    """A server-chosen, unique instance id within `pool`."""
    return f"{pool}-{uuid.uuid4().hex[:12]}"


T = TypeVar("T")


class JsonCodec(Generic[T]):
    """Validated JSON encoding of one registry type."""

    def __init__(self, cls: type[T]) -> None:
        self._adapter: TypeAdapter[T] = TypeAdapter(cls)

    def encode(self, value: T) -> str:
        return self._adapter.dump_json(value).decode()

    def decode(self, raw: str | bytes) -> T:
        return self._adapter.validate_json(raw)


INSTANCE_CODEC = JsonCodec(InstanceInfo)
LOAD_CODEC = JsonCodec(LoadReport)
