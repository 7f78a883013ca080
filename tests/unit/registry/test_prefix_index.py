"""The prefix-block index: sets, overlap queries, and the event stream."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
import redis

from engine.block_hash import chain_hashes
from registry import (
    InstanceInfo,
    PrefixEvent,
    PrefixEventGap,
    PrefixOp,
    Registry,
    Role,
)

Clean = Callable[[Registry], None]
BLOCK = 4


def _register(reg: Registry, *ids: str) -> None:
    for instance_id in ids:
        reg.register(InstanceInfo(instance_id=instance_id, pool="decode", role=Role.DECODE))


def _apply(mirror: dict[str, set[int]], events: list[PrefixEvent]) -> None:
    """How a router keeps a local copy of the index from the stream."""
    for e in events:
        held = mirror.setdefault(e.instance_id, set())
        if e.op is PrefixOp.ADD:
            held.update(e.block_hashes)
        elif e.op is PrefixOp.EVICT:
            held.difference_update(e.block_hashes)
        else:
            mirror.pop(e.instance_id)


def test_overlap_counts_leading_blocks(registry: Registry, assert_clean: Clean) -> None:
    prompt = list(range(100, 124))  # 6 full blocks
    chain = chain_hashes(prompt, BLOCK)
    other = chain_hashes(list(range(500, 516)), BLOCK)
    _register(registry, "a", "b", "c", "d")
    registry.publish_blocks("a", PrefixOp.ADD, chain[:4])
    registry.publish_blocks("b", PrefixOp.ADD, chain)
    registry.publish_blocks("b", PrefixOp.EVICT, [chain[2]])  # a hole: blocks 3.. don't count
    registry.publish_blocks("c", PrefixOp.ADD, chain[1:] + other)  # no first block: 0
    registry.publish_blocks("d", PrefixOp.ADD, other)

    assert registry.overlap(chain) == {"a": 4, "b": 2}
    assert registry.overlap(chain[:1]) == {"a": 1, "b": 1}
    assert registry.overlap(chain, instance_ids=["b", "c"]) == {"b": 2}
    assert registry.overlap(other) == {"c": 4, "d": 4}
    assert registry.overlap([]) == {}

    registry.publish_blocks("a", PrefixOp.EVICT, chain[3:4])
    assert registry.overlap(chain)["a"] == 3
    for instance_id in "abcd":
        registry.deregister(instance_id)
    assert registry.overlap(chain) == {}
    assert_clean(registry)


def test_publish_is_idempotent_and_full_range(
    registry: Registry, redis_client: redis.Redis, assert_clean: Clean
) -> None:
    _register(registry, "a")
    edge = [0, 1, 2**63, 2**64 - 1]
    for _ in range(2):
        registry.publish_blocks("a", PrefixOp.ADD, edge)
    assert registry.prefix_index.blocks("a") == frozenset(edge)
    assert registry.overlap(edge) == {"a": 4}
    set_ttl = redis_client.pttl(registry.keys.prefix_set("a"))
    assert 0 < set_ttl <= registry.lease_ttl_s * 1000
    for _ in range(2):
        registry.publish_blocks("a", PrefixOp.EVICT, [1])
    assert registry.prefix_index.blocks("a") == frozenset(edge) - {1}
    registry.publish_blocks("a", PrefixOp.ADD, [])  # nothing to do, no event
    assert redis_client.xlen(registry.keys.prefix_events) == 4
    registry.deregister("a")
    assert_clean(registry)


@pytest.mark.parametrize("bad", [-1, 2**64, True, 1.5, "7"])
def test_invalid_hash_is_rejected(registry: Registry, bad: object) -> None:
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        registry.publish_blocks("a", PrefixOp.ADD, [1, bad])  # type: ignore[list-item]
    with pytest.raises(ValueError, match="unsigned 64-bit"):
        registry.overlap([bad])  # type: ignore[list-item]
    assert registry.namespace_keys() == set()


def test_clear_is_not_published_by_instances(registry: Registry) -> None:
    with pytest.raises(ValueError, match="CLEAR"):
        registry.publish_blocks("a", PrefixOp.CLEAR, [1])


def test_snapshot_then_follow_the_stream(registry: Registry, assert_clean: Clean) -> None:
    """A reader that snapshots and then applies events mirrors the index exactly,
    including deregistration (CLEAR)."""
    _register(registry, "a", "b")
    registry.publish_blocks("a", PrefixOp.ADD, [1, 2, 3])
    reader = registry.prefix_events()
    snap = reader.sync()
    assert snap.blocks == {"a": frozenset({1, 2, 3}), "b": frozenset()}
    assert reader.cursor == snap.last_event_id != "0-0"
    mirror = {k: set(v) for k, v in snap.blocks.items()}

    registry.publish_blocks("b", PrefixOp.ADD, [7, 8])
    registry.publish_blocks("a", PrefixOp.EVICT, [2])
    registry.publish_blocks("a", PrefixOp.ADD, [4])
    _apply(mirror, reader.poll(count=2))
    _apply(mirror, reader.poll(count=2))
    assert mirror == {"a": {1, 3, 4}, "b": {7, 8}}
    assert {k: set(v) for k, v in registry.prefix_index.snapshot().blocks.items()} == mirror

    registry.deregister("b")
    _apply(mirror, reader.poll())
    assert mirror == {"a": {1, 3, 4}}
    assert reader.poll() == []
    registry.deregister("a")
    _apply(mirror, reader.poll())
    assert mirror == {}
    assert_clean(registry)


def test_snapshot_of_empty_stream_reads_from_start(registry: Registry, assert_clean: Clean) -> None:
    reader = registry.prefix_events()
    assert reader.sync().last_event_id == "0-0"
    _register(registry, "a")
    registry.publish_blocks("a", PrefixOp.ADD, [5])
    assert [(e.op, e.block_hashes) for e in reader.poll()] == [(PrefixOp.ADD, (5,))]
    registry.deregister("a")
    assert_clean(registry)


def test_poll_waits_at_most_block_ms(registry: Registry) -> None:
    reader = registry.prefix_events()
    reader.sync()
    t0 = time.monotonic()
    assert reader.poll(block_ms=150) == []
    assert 0.1 <= time.monotonic() - t0 < 1.0
    with pytest.raises(ValueError, match="socket timeout"):
        reader.poll(block_ms=60_000)
    with pytest.raises(RuntimeError, match="sync"):
        registry.prefix_events().poll()


def test_trimmed_stream_is_reported_as_a_gap(
    make_registry: Callable[..., Registry], assert_clean: Clean
) -> None:
    reg = make_registry(events_maxlen=10)
    _register(reg, "a")
    reader = reg.prefix_events()
    reader.sync()
    reg.publish_blocks("a", PrefixOp.ADD, [0])
    reader.poll(count=1)  # the cursor now sits on the first event
    for h in range(1, 400):  # MAXLEN ~ trims whole stream nodes (100 entries each)
        reg.publish_blocks("a", PrefixOp.ADD, [h])
    with pytest.raises(PrefixEventGap):
        reader.poll()
    snap = reader.sync()  # recovery: a fresh snapshot
    assert snap.blocks["a"] == frozenset(range(400))
    assert reader.poll() == []
    reg.deregister("a")
    assert_clean(reg)
