"""Load reports: each instance's latest `LoadReport`, kept under a TTL.

An instance (or its heartbeat) calls `report` periodically; a report that is not
refreshed expires with the lease TTL, so `all` never returns load from an instance
that stopped reporting. Writes are plain SETs and idempotent.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import redis
from pydantic import ValidationError

from registry.client import text
from registry.keys import Keyspace
from registry.types import LOAD_CODEC, LoadReport

logger = logging.getLogger(__name__)


class LoadStore:
    def __init__(self, client: redis.Redis, keys: Keyspace, ttl_ms: int) -> None:
        self._client = client
        self._keys = keys
        self._ttl_ms = ttl_ms

    def report(self, instance_id: str, load: LoadReport) -> None:
        self._client.set(self._keys.load(instance_id), LOAD_CODEC.encode(load), px=self._ttl_ms)

    def queue_report(self, pipe: redis.client.Pipeline, instance_id: str, load: LoadReport) -> None:
        """Add the report to a caller's pipeline (the heartbeat's transaction)."""
        pipe.set(self._keys.load(instance_id), LOAD_CODEC.encode(load), px=self._ttl_ms)

    def all(self, instance_ids: Iterable[str] | None = None) -> dict[str, LoadReport]:
        """Latest unexpired reports, by instance id (all registered ids by default)."""
        if instance_ids is None:
            ids = sorted(text(m) for m in self._client.smembers(self._keys.instances))
        else:
            ids = list(instance_ids)
        if not ids:
            return {}
        raw = self._client.mget([self._keys.load(i) for i in ids])
        out: dict[str, LoadReport] = {}
        for instance_id, value in zip(ids, raw, strict=True):
            if value is None:
                continue
            try:
                out[instance_id] = LOAD_CODEC.decode(value)
            except ValidationError:
                logger.warning("ignoring malformed load report of %s", instance_id)
        return out
