"""Leak checks that tests end with."""

from __future__ import annotations

from engine import LLM


def assert_engine_empty(llm: LLM) -> None:
    """No request left and every block back in the pool (cached prefixes may stay)."""
    eng = llm.engine
    assert not eng.has_unfinished_requests(), "requests left in the engine"
    assert not eng.scheduler.running and not eng.scheduler.waiting
    pool = eng.block_pool
    assert pool.num_free == pool.num_blocks, (
        f"{pool.num_blocks - pool.num_free} KV blocks still referenced"
    )
