"""The prefix-block index: which instance holds which KV block hashes.

Writers (prefill and decode instances) call `publish(instance_id, ADD|EVICT, hashes)`
when blocks enter or leave their prefix cache. Each call is one MULTI transaction:
SADD/SREM on the instance's set (idempotent, so a retried call is harmless), a TTL
refresh of that set, and one event on a capped stream.

Readers either query Redis directly (`overlap`: how many leading blocks of a prompt's
hash chain each instance holds) or keep a local copy: take a `snapshot()` (all sets
plus the id of the last event they reflect, atomically) and then follow the stream
with a `PrefixEventReader`. Events are applied idempotently; a reader that fell so far
behind that the stream was trimmed past its cursor gets `PrefixEventGap` and must
take a new snapshot. When an instance leaves, its set is deleted and a CLEAR event is
published.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import redis
from redis.typing import EncodableT, FieldT

from registry.client import require_timeout, text
from registry.keys import Keyspace
from registry.types import PrefixEvent, PrefixOp, PrefixSnapshot

logger = logging.getLogger(__name__)

STREAM_START = "0-0"
_U64 = 2**64

# Sets and the last event id in one atomic step. KEYS[1]: the instance index,
# KEYS[2]: the event stream; ARGV[1]: the prefix-set key prefix.
_SNAPSHOT_LUA = """
local last = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', 1)
local out = {}
if #last > 0 then out[1] = last[1][1] else out[1] = '0-0' end
for _, id in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  table.insert(out, id)
  table.insert(out, table.concat(redis.call('SMEMBERS', ARGV[1] .. id), ' '))
end
return out
"""


class PrefixEventGap(RuntimeError):
    """Events after the reader's cursor were trimmed; take a new snapshot."""


def _stream_id(event_id: str) -> tuple[int, int]:
    ms, _, seq = event_id.partition("-")
    return int(ms), int(seq or 0)


def _encode_hashes(block_hashes: Sequence[int]) -> list[str]:
    for h in block_hashes:
        if isinstance(h, bool) or not isinstance(h, int) or not 0 <= h < _U64:
            raise ValueError(f"block hash {h!r} is not an unsigned 64-bit int")
    return [str(h) for h in block_hashes]


def _decode_hashes(field: str) -> tuple[int, ...]:
    return tuple(int(h) for h in field.split())


class PrefixIndex:
    def __init__(
        self, client: redis.Redis, keys: Keyspace, ttl_ms: int, events_maxlen: int
    ) -> None:
        self._client = client
        self._keys = keys
        self._ttl_ms = ttl_ms
        self._maxlen = events_maxlen
        self._snapshot = client.register_script(_SNAPSHOT_LUA)

    # -- writers -----------------------------------------------------------------

    def publish(self, instance_id: str, op: PrefixOp, block_hashes: Sequence[int]) -> str | None:
        """Record that `instance_id` added or evicted these blocks. Returns the event id,
        or None when there was nothing to publish."""
        if op is PrefixOp.CLEAR:
            raise ValueError("CLEAR is published by deregistration, not by instances")
        members = _encode_hashes(block_hashes)
        if not members:
            return None
        key = self._keys.prefix_set(instance_id)
        pipe = self._client.pipeline(transaction=True)
        if op is PrefixOp.ADD:
            pipe.sadd(key, *members)
            pipe.pexpire(key, self._ttl_ms)
        else:
            pipe.srem(key, *members)
        self.queue_event(pipe, instance_id, op, members)
        event_id: str = text(pipe.execute()[-1])
        return event_id

    def queue_event(
        self, pipe: redis.client.Pipeline, instance_id: str, op: PrefixOp, members: Sequence[str]
    ) -> None:
        fields: dict[FieldT, EncodableT] = {
            "instance": instance_id,
            "op": op.value,
            "hashes": " ".join(members),
        }
        pipe.xadd(self._keys.prefix_events, fields, maxlen=self._maxlen, approximate=True)

    def queue_clear(self, pipe: redis.client.Pipeline, instance_id: str) -> None:
        """Add the deletion of an instance's set, and its CLEAR event, to a pipeline."""
        pipe.delete(self._keys.prefix_set(instance_id))
        self.queue_event(pipe, instance_id, PrefixOp.CLEAR, ())

    def queue_refresh(self, pipe: redis.client.Pipeline, instance_id: str) -> None:
        """Extend the set's TTL (the heartbeat does this with the lease)."""
        pipe.pexpire(self._keys.prefix_set(instance_id), self._ttl_ms)

    # -- readers -----------------------------------------------------------------

    def blocks(self, instance_id: str) -> frozenset[int]:
        members = self._client.smembers(self._keys.prefix_set(instance_id))
        return frozenset(int(text(m)) for m in members)

    def overlap(
        self, block_hashes: Sequence[int], instance_ids: Sequence[str] | None = None
    ) -> dict[str, int]:
        """For each instance (all registered ones by default), how many leading hashes
        of the chain `block_hashes` it holds. Instances holding none are left out."""
        members = _encode_hashes(block_hashes)
        if instance_ids is None:
            ids = sorted(text(m) for m in self._client.smembers(self._keys.instances))
        else:
            ids = list(instance_ids)
        if not members or not ids:
            return {}
        pipe = self._client.pipeline(transaction=False)
        for instance_id in ids:
            pipe.smismember(self._keys.prefix_set(instance_id), members)
        out: dict[str, int] = {}
        for instance_id, flags in zip(ids, pipe.execute(), strict=True):
            leading = 0
            for flag in flags:
                if not flag:
                    break
                leading += 1
            if leading:
                out[instance_id] = leading
        return out

    def snapshot(self) -> PrefixSnapshot:
        reply = self._snapshot(
            keys=[self._keys.instances, self._keys.prefix_events],
            args=[self._keys.prefix_set_prefix],
        )
        items = [text(x) for x in reply]
        blocks = {
            items[i]: frozenset(_decode_hashes(items[i + 1])) for i in range(1, len(items), 2)
        }
        return PrefixSnapshot(last_event_id=items[0], blocks=blocks)

    def read_events(
        self, after_id: str, *, count: int = 1000, block_ms: int | None = None
    ) -> list[PrefixEvent]:
        """Events after `after_id`, oldest first, at most `count`. With `block_ms`, waits
        up to that long for the first one (it must be shorter than the socket timeout).
        Raises `PrefixEventGap` when events after `after_id` may have been trimmed."""
        if block_ms is not None and not 0 < block_ms < require_timeout(self._client) * 1000:
            raise ValueError("block_ms must be positive and below the client's socket timeout")
        stream = self._keys.prefix_events
        reply: object = self._client.xread({stream: after_id}, count=count, block=block_ms)
        if isinstance(reply, dict):  # RESP3: {stream: [entries]}
            entries = _stream_entries(next(iter(reply.values()), [[]])[0])
        else:  # RESP2: [[stream, entries]]
            entries = _stream_entries(reply[0][1] if isinstance(reply, list) and reply else [])
        if after_id != STREAM_START:
            self._check_gap(after_id)
        return [
            PrefixEvent(
                event_id=event_id,
                instance_id=fields["instance"],
                op=PrefixOp(fields["op"]),
                block_hashes=_decode_hashes(fields.get("hashes", "")),
            )
            for event_id, fields in entries
        ]

    def _check_gap(self, after_id: str) -> None:
        oldest = _stream_entries(self._client.xrange(self._keys.prefix_events, count=1))
        if oldest and _stream_id(oldest[0][0]) > _stream_id(after_id):
            raise PrefixEventGap(
                f"prefix events after {after_id} were trimmed (oldest is {oldest[0][0]})"
            )


def _stream_entries(raw: object) -> list[tuple[str, dict[str, str]]]:
    """Stream entries from an XRANGE/XREAD reply, as (id, fields) with str values."""
    if not isinstance(raw, list):
        raise TypeError(f"unexpected stream reply {type(raw).__name__}")
    out: list[tuple[str, dict[str, str]]] = []
    for event_id, fields in raw:
        out.append((text(event_id), {text(k): text(v) for k, v in fields.items()}))
    return out


class PrefixEventReader:
    """A cursor over the event stream. Start with `sync()`, then `poll()` repeatedly."""

    def __init__(self, index: PrefixIndex) -> None:
        self._index = index
        self._cursor: str | None = None

    @property
    def cursor(self) -> str | None:
        return self._cursor

    def sync(self) -> PrefixSnapshot:
        snap = self._index.snapshot()
        self._cursor = snap.last_event_id
        return snap

    def poll(self, *, count: int = 1000, block_ms: int | None = None) -> list[PrefixEvent]:
        if self._cursor is None:
            raise RuntimeError("call sync() before poll()")
        events = self._index.read_events(self._cursor, count=count, block_ms=block_ms)
        if events:
            self._cursor = events[-1].event_id
        return events
