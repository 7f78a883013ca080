"""The routing table the controller steers, and the demand the routers report to it.

Writers and readers:

    controller   `set_role(id, role)` flips a switchable instance between prefill and
                 decode (a HASH: the routing table), `clear_role` returns it to its
                 pool's role, `set_threshold` moves the disaggregation threshold, and
                 `log_decision` appends each decision to a capped stream
    router       `read()` once per view refresh: the role overrides and the threshold
                 (None: the config's); `report_admission` writes its cumulative
                 admission counts under a TTL, so a router that stopped reporting
                 leaves the controller's demand within one TTL
    controller   `admissions()` reads every router's latest counts; the controller
                 turns two reads into rates (arrivals, refusals, queue time)

Nothing here deletes an override by itself: the controller prunes the overrides of
instances that left (`prune_roles`). Every call is one round trip, bounded by the
client's socket timeout.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Annotated

import redis
from pydantic import ConfigDict, Field, ValidationError
from pydantic.dataclasses import dataclass as pydantic_dataclass

from registry.client import text
from registry.keys import Keyspace
from registry.types import JsonCodec, Name, NonNegInt, Role

logger = logging.getLogger(__name__)

DEFAULT_DECISIONS_MAXLEN = 10_000
NonNegFloat = Annotated[float, Field(ge=0)]
_FLIPPABLE = (Role.PREFILL, Role.DECODE)
_CONFIG = ConfigDict(strict=True, extra="ignore")


@pydantic_dataclass(frozen=True, config=_CONFIG)
class AdmissionReport:
    """One router replica's counts since it started at `started` (wall time); all
    cumulative, so two reports of the same `started` give rates over their interval."""

    router_id: Name
    started: NonNegFloat
    ts: NonNegFloat
    arrived: NonNegInt = 0  # every request that reached the router, refused ones too
    refused: NonNegInt = 0  # refused for capacity: a full router, no live instance
    finished: NonNegInt = 0
    failed: NonNegInt = 0  # admitted, then failed or cancelled
    prompt_tokens: NonNegInt = 0  # of finished requests
    completion_tokens: NonNegInt = 0
    queue_s: NonNegFloat = 0.0  # sums over finished requests: TTFT before prefill
    remote_queue_s: NonNegFloat = 0.0  # the same over those prefilled remotely
    remote_count: NonNegInt = 0
    ttft_s: NonNegFloat = 0.0
    tpot_s: NonNegFloat = 0.0  # over finished requests with more than one token
    tpot_count: NonNegInt = 0
    inflight: NonNegInt = 0  # at `ts`


ADMISSION_CODEC = JsonCodec(AdmissionReport)


@dataclass(frozen=True)
class RoutingState:
    """What a router applies: role overrides by instance id, and the threshold."""

    roles: Mapping[str, Role]
    threshold: int | None


class RoutingTable:
    def __init__(
        self,
        client: redis.Redis,
        keys: Keyspace,
        ttl_ms: int,
        decisions_maxlen: int = DEFAULT_DECISIONS_MAXLEN,
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl_ms = ttl_ms
        self._decisions_maxlen = decisions_maxlen

    # -- the table --------------------------------------------------------------------

    def read(self) -> RoutingState:
        pipe = self._client.pipeline(transaction=False)
        pipe.hgetall(self._keys.roles)
        pipe.get(self._keys.threshold)
        raw_roles, raw_threshold = pipe.execute()
        roles: dict[str, Role] = {}
        for key, value in raw_roles.items():
            try:
                role = Role(text(value))
            except ValueError:
                logger.warning("ignoring role %r of %s in the routing table", value, key)
                continue
            if role in _FLIPPABLE:
                roles[text(key)] = role
        threshold: int | None = None
        if raw_threshold is not None:
            try:
                threshold = max(0, int(text(raw_threshold)))
            except ValueError:
                logger.warning("ignoring threshold %r in the routing table", raw_threshold)
        return RoutingState(roles, threshold)

    def set_role(self, instance_id: str, role: Role) -> None:
        if role not in _FLIPPABLE:
            raise ValueError(f"role: an instance is flipped to prefill or decode, not {role}")
        self._client.hset(self._keys.roles, instance_id, role.value)

    def clear_role(self, instance_id: str) -> None:
        self._client.hdel(self._keys.roles, instance_id)

    def prune_roles(self, live_ids: Iterable[str]) -> list[str]:
        """Drop the overrides of instances not in `live_ids`; returns their ids."""
        live = set(live_ids)
        gone = [text(k) for k in self._client.hkeys(self._keys.roles) if text(k) not in live]
        if gone:
            self._client.hdel(self._keys.roles, *gone)
        return gone

    def set_threshold(self, threshold: int) -> None:
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        self._client.set(self._keys.threshold, str(threshold))

    def clear(self) -> None:
        """Back to the config: no overrides, the config's threshold."""
        self._client.delete(self._keys.roles, self._keys.threshold)

    # -- demand -------------------------------------------------------------------------

    def report_admission(self, report: AdmissionReport) -> None:
        self._client.set(
            self._keys.admission(report.router_id),
            ADMISSION_CODEC.encode(report),
            px=self._ttl_ms,
        )

    def drop_admission(self, router_id: str) -> None:
        """A router that stops removes its report at once."""
        self._client.delete(self._keys.admission(router_id))

    def admissions(self) -> dict[str, AdmissionReport]:
        """Every router's latest unexpired report, by router id."""
        keys = sorted(
            text(k)
            for k in self._client.scan_iter(match=self._keys.admission_prefix + "*", count=100)
        )
        if not keys:
            return {}
        out: dict[str, AdmissionReport] = {}
        for value in self._client.mget(keys):
            if value is None:
                continue
            try:
                report = ADMISSION_CODEC.decode(value)
            except ValidationError:
                logger.warning("ignoring a malformed admission report")
                continue
            out[report.router_id] = report
        return out

    # -- the decision log -----------------------------------------------------------------

    def log_decision(self, record: Mapping[str, object]) -> None:
        """Append one decision (JSON-encodable fields) to the capped stream."""
        self._client.xadd(
            self._keys.decisions,
            {"decision": json.dumps(record, sort_keys=True)},
            maxlen=self._decisions_maxlen,
            approximate=True,
        )

    def decisions(self, count: int = 1000) -> list[dict[str, object]]:
        """The latest `count` decisions, oldest first."""
        entries = self._client.xrevrange(self._keys.decisions, count=count) or []
        out: list[dict[str, object]] = []
        for _, fields in reversed(list(entries)):
            raw = (fields or {}).get("decision")
            if raw is not None:
                out.append(json.loads(text(raw)))
        return out
