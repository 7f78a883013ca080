"""Where receiver ranks publish how to reach them: a small key-value store with TTLs.

A receiver rank publishes one record under `<transport>:<instance>:<rank>` and keeps
it alive with a `Lease`, which refreshes it every third of its TTL and withdraws it on
close (only if the record is still its own). A rank that dies stops refreshing, and
its record disappears within one TTL. Senders look records up on first use of a pair.

`RedisRendezvous` keeps records in the cluster's Redis under `pdserve:<cluster>:kv:`;
`MemoryRendezvous` is the in-process stand-in for tests. Records are JSON objects of
plain strings and integers, parsed with strict checks: nothing is unpickled.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Protocol

from kv_transfer.base import RankId, TransferError

logger = logging.getLogger(__name__)

# Deletes KEYS[1] only while it still holds ARGV[1].
_DELETE_IF_OURS = """
if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end
return 0
"""


class RendezvousStore(Protocol):
    def publish(self, key: str, value: str, ttl_s: float) -> None:
        """Set `key` to `value`, expiring after `ttl_s` unless published again."""
        ...

    def lookup(self, key: str) -> str | None: ...

    def withdraw(self, key: str, value: str) -> None:
        """Delete `key` if it still holds `value`."""
        ...


class RedisClient(Protocol):
    """The few calls of `redis.Redis` used here."""

    def set(self, name: str, value: str, *, px: int | None = None) -> Any: ...

    def get(self, name: str) -> Any: ...

    def eval(self, script: str, numkeys: int, *keys_and_args: str) -> Any: ...


class RedisRendezvous:
    """Records in the cluster's Redis, namespaced `pdserve:<cluster>:kv:`."""

    def __init__(self, client: RedisClient, cluster: str) -> None:
        if not cluster or ":" in cluster:
            raise ValueError(f"cluster name {cluster!r} must be non-empty and free of ':'")
        self._client = client
        self.prefix = f"pdserve:{cluster}:kv:"

    def publish(self, key: str, value: str, ttl_s: float) -> None:
        self._client.set(self.prefix + key, value, px=max(1, int(ttl_s * 1000)))

    def lookup(self, key: str) -> str | None:
        raw = self._client.get(self.prefix + key)
        if raw is None:
            return None
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def withdraw(self, key: str, value: str) -> None:
        self._client.eval(_DELETE_IF_OURS, 1, self.prefix + key, value)


class MemoryRendezvous:
    """An in-process store with the same semantics, for tests."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._items: dict[str, tuple[str, float]] = {}

    def publish(self, key: str, value: str, ttl_s: float) -> None:
        with self._lock:
            self._items[key] = (value, time.monotonic() + ttl_s)

    def lookup(self, key: str) -> str | None:
        with self._lock:
            item = self._items.get(key)
            if item is None or item[1] < time.monotonic():
                self._items.pop(key, None)
                return None
            return item[0]

    def withdraw(self, key: str, value: str) -> None:
        with self._lock:
            if key in self._items and self._items[key][0] == value:
                del self._items[key]

    def keys(self) -> list[str]:
        with self._lock:
            now = time.monotonic()
            return [k for k, (_, exp) in self._items.items() if exp >= now]


def rank_key(transport: str, rank: RankId) -> str:
    return f"{transport}:{rank.instance}:{rank.rank}"


class Lease:
    """Keeps one record published until `close()`; refreshes every `ttl_s / 3`."""

    def __init__(self, store: RendezvousStore, key: str, value: str, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        self._store, self.key, self.value, self._ttl = store, key, value, ttl_s
        self._stop = threading.Event()
        store.publish(key, value, ttl_s)
        self._thread = threading.Thread(target=self._refresh, name="kv-lease", daemon=True)
        self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self._ttl / 3):
            try:
                self._store.publish(self.key, self.value, self._ttl)
            except Exception as e:  # Redis briefly away: retry on the next tick
                logger.warning("refreshing rendezvous %s failed: %s", self.key, e)

    def close(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        self._thread.join(timeout=self._ttl)
        try:
            self._store.withdraw(self.key, self.value)
        except Exception as e:
            logger.warning("withdrawing rendezvous %s failed: %s", self.key, e)


def encode_record(**fields: str | int) -> str:
    return json.dumps(fields, sort_keys=True)


def decode_record(raw: str, schema: Mapping[str, type]) -> dict[str, Any]:
    """Parse a JSON record holding exactly `schema`'s fields, each of its type."""
    try:
        obj = json.loads(raw)
    except ValueError as e:
        raise TransferError(f"malformed rendezvous record: {e}") from None
    if not isinstance(obj, dict) or set(obj) != set(schema):
        got = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise TransferError(f"rendezvous record has fields {got}, expected {sorted(schema)}")
    for name, kind in schema.items():
        if type(obj[name]) is not kind:
            raise TransferError(f"rendezvous record field {name!r} is not {kind.__name__}")
    return obj


def resolve(
    store: RendezvousStore, transport: str, rank: RankId, schema: Mapping[str, type]
) -> dict[str, Any]:
    """The record `rank` published for `transport`; TransferError if there is none."""
    raw = store.lookup(rank_key(transport, rank))
    if raw is None:
        raise TransferError(f"no {transport} receiver {rank} in the rendezvous store")
    return decode_record(raw, schema)


def split_hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise TransferError(f"bad address {text!r}")
    return host, int(port)
