"""Prefix caching, preemption under a tiny KV budget, aborts, and the block pool."""

from __future__ import annotations

import random

import pytest
from leak_checks import assert_engine_empty

from engine import SamplingParams
from engine.block_hash import chain_hashes
from engine.block_pins import BlockPins
from engine.block_pool import BlockPool, CacheEvent, OutOfBlocksError

GREEDY = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)


def _prompt(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 49152) for _ in range(n)]


def test_prefix_cache_reuses_blocks_and_keeps_output(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, block_size=16)
    shared = _prompt(200, 1)
    a, b = shared + _prompt(9, 2), shared + _prompt(11, 3)
    cold = make_llm(tiny_model_dir, block_size=16, enable_prefix_caching=False)
    expect_b = cold.generate([b], GREEDY)[0].token_ids

    (out_a,) = llm.generate([a], GREEDY)
    hits_before = llm.engine.block_pool.stats.prefix_hits
    (out_b,) = llm.generate([b], GREEDY)
    assert out_a.metrics is not None and out_a.metrics.num_cached_tokens == 0
    assert out_b.metrics is not None and out_b.metrics.num_cached_tokens == 192  # 12 full blocks
    assert llm.engine.block_pool.stats.prefix_hits - hits_before == 12
    assert out_b.token_ids == expect_b


def test_fully_cached_prompt_still_computes_its_last_token(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, block_size=16)
    prompt = _prompt(64, 4)  # exactly 4 blocks
    first = llm.generate([prompt], GREEDY)[0]
    again = llm.generate([prompt], GREEDY)[0]
    assert again.metrics is not None and again.metrics.num_cached_tokens == 48
    assert again.token_ids == first.token_ids


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_preemption_under_tiny_budget_keeps_outputs(
    make_llm, tiny_model_dir, prefix_caching: bool
) -> None:
    """Without prefix caching, a recompute resumes after the leading blocks it had
    computed that were not handed out since; outputs are the same either way."""
    prompts = [_prompt(n, 10 + n) for n in (40, 55, 70, 33, 90, 61)]
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    roomy = make_llm(tiny_model_dir, block_size=8).generate(prompts, params)
    # 40 blocks of 8 tokens: far less than six sequences of ~100 tokens need at once.
    tight_llm = make_llm(
        tiny_model_dir,
        block_size=8,
        max_model_len=256,
        kv_cache_bytes=40 * 8 * 1024,
        enable_prefix_caching=prefix_caching,
    )
    assert tight_llm.engine.block_pool.num_blocks == 40
    eng = tight_llm.engine
    for i, p in enumerate(prompts):
        eng.add_request(str(i), p, params)
    final = {}
    for _ in range(2000):  # bounded: a livelock fails the test instead of hanging it
        for out in eng.step():
            if out.finished:
                final[out.request_id] = out.token_ids
        # only running sequences hold blocks
        assert all(not s.block_table for s in eng.scheduler.waiting)
        held = sum(len(s.block_table) for s in eng.scheduler.running)
        assert eng.block_pool.num_free >= eng.block_pool.num_blocks - held
        if not eng.has_unfinished_requests():
            break
    assert eng.scheduler.num_preemptions > 0
    assert [final[str(i)] for i in range(len(prompts))] == [r.token_ids for r in roomy]


def test_abort_frees_blocks_mid_prefill_and_mid_decode(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, block_size=8, max_num_batched_tokens=32)
    eng = llm.engine
    params = SamplingParams(temperature=0, max_tokens=50, ignore_eos=True)
    eng.add_request("long", _prompt(300, 5), params)  # needs ~10 chunked steps
    eng.add_request("short", _prompt(5, 6), params)
    eng.add_request("queued", _prompt(7, 7), params)
    eng.step()
    eng.step()
    assert eng.block_pool.num_free < eng.block_pool.num_blocks
    eng.abort_request("long")  # mid-prefill
    for _ in range(5):
        eng.step()
    eng.abort_request("short")  # mid-decode
    eng.abort_request("queued")
    eng.abort_request("unknown")  # no-op
    assert_engine_empty(llm)


def test_block_pool_refcounts_and_lru_eviction() -> None:
    events: list[tuple[CacheEvent, int]] = []
    pool = BlockPool(4, listener=lambda e, h: events.append((e, h)))
    a = pool.allocate(2)
    pool.cache(a[0], 111)
    pool.cache(a[1], 222)
    pool.cache(a[1], 222)  # idempotent
    assert events == [(CacheEvent.ADD, 111), (CacheEvent.ADD, 222)]
    pool.release(reversed(a))  # tail first: 222 is older in the free list than 111
    assert pool.num_free == 4
    assert pool.lookup(111) == a[0]
    pool.acquire(a[0])  # a hit takes the block back out of the free list
    assert pool.num_free == 3 and pool.ref_count(a[0]) == 1
    got = pool.allocate(3)  # the two never-used blocks, then evicts 222
    assert a[1] in got and events[-1] == (CacheEvent.EVICT, 222)
    assert pool.lookup(222) is None and pool.lookup(111) == a[0]
    with pytest.raises(OutOfBlocksError):
        pool.allocate(1)
    pool.release([a[0], *got])
    with pytest.raises(RuntimeError):
        pool.release([a[0]])
    assert pool.num_free == 4


def test_a_block_is_reclaimed_only_if_not_handed_out_since() -> None:
    pool = BlockPool(3)
    a, b = pool.allocate(2)
    gens = {a: pool.generation(a), b: pool.generation(b)}
    pool.acquire(a)  # a second holder (a pin) keeps a allocated
    pool.release([b, a])  # the sequence lets go of both
    assert pool.num_free == 2
    assert pool.reclaim(a, gens[a]) and pool.ref_count(a) == 2  # held all along
    assert pool.reclaim(b, gens[b]) and pool.ref_count(b) == 1  # free, never reused
    assert pool.num_free == 1
    pool.release([b])
    taken = pool.allocate(2)  # the never-used block, then b: written by someone else
    assert b in taken and not pool.reclaim(b, gens[b])
    pool.release([a, a, *taken])
    assert pool.num_free == 3


def test_pins_hold_blocks_after_their_sequence_lets_go() -> None:
    pool = BlockPool(4)
    pins = BlockPins(pool)
    seq = pool.allocate(3)
    pool.cache(seq[0], 111)
    pins.pin("t", seq[:1])
    pins.pin("t", seq[1:2])  # a second chunk's blocks join the same key
    pool.release(reversed(seq))  # the engine is done with the sequence
    assert pool.num_free == 2 and "t" in pins and pins.num_pinned == 1
    assert pool.lookup(111) == seq[0]  # a pinned full block stays a prefix hit
    with pytest.raises(ValueError, match="is free"):
        pins.pin("u", [seq[2]])
    assert "u" not in pins
    assert set(pool.allocate(2)) == {seq[2], 3}  # never a pinned block
    pins.release("t")  # tail first: seq[1] is handed out before seq[0]
    pins.release("t")  # a key not pinned is a no-op
    assert pool.num_free == 2 and pins.num_pinned == 0
    assert pool.allocate(1) == [seq[1]]


def test_a_prompt_waits_for_pinned_blocks(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, block_size=8, max_model_len=64, kv_cache_bytes=8 * 8 * 1024)
    eng = llm.engine
    pool = eng.block_pool
    assert pool.num_blocks == 8
    pins = BlockPins(pool)
    held = pool.allocate(5)
    pins.pin("t", held)
    pool.release(held)  # only the pins hold them now, as after a finished prefill
    params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True)
    eng.add_request("r", _prompt(40, 1), params)  # needs 6 blocks; 3 are free
    assert eng.step() == [] and eng.step() == []  # it waits instead of failing
    pins.release("t")
    for _ in range(20):
        if any(out.finished for out in eng.step()):
            break
    assert not eng.has_unfinished_requests() and pool.num_free == pool.num_blocks


def test_chain_hashes_depend_on_the_whole_prefix() -> None:
    x = list(range(40))
    y = [99, *x[1:]]
    hx, hy = chain_hashes(x, 16), chain_hashes(y, 16)
    assert len(hx) == 2  # the partial third block is not hashed
    assert hx[0] != hy[0] and hx[1] != hy[1]  # a change in block 0 changes block 1's hash
    assert chain_hashes(x[:32], 16) == hx
