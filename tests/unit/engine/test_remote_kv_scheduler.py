"""The scheduler's waiting-for-remote-KV queue, step by step on the CPU, without a model.

Each test drives `schedule()`, fakes what the transfer or the step did (the KV landing,
a failure, the computed chunk), and ends with a leak check: every block back in the
pool, no sequence left in any queue.
"""

from __future__ import annotations

import pytest

from engine.block_manager import BlockManager
from engine.block_pool import BlockPool, OutOfBlocksError
from engine.sampling import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, Status

BS = 4


def _sched(num_blocks: int = 16, prefix_caching: bool = True, max_tokens: int = 64) -> Scheduler:
    pool = BlockPool(num_blocks)
    return Scheduler(BlockManager(pool, BS, prefix_caching), max_tokens, 8)


def _seq(rid: str, n: int, base: int = 100) -> Sequence:
    return Sequence(rid, list(range(base, base + n)), SamplingParams(max_tokens=4), BS, None, None)


def assert_scheduler_empty(s: Scheduler) -> None:
    assert not s.waiting and not s.running and not s.remote
    pool = s.blocks.pool
    assert pool.num_free == pool.num_blocks, f"{pool.num_blocks - pool.num_free} blocks held"


def _run_to_end(s: Scheduler, seq: Sequence, new_token: int = 7) -> None:
    """Step the batch, appending a token per sampling chunk, until `seq` has 3 outputs."""
    for _ in range(20):
        out = s.schedule()
        s.advance(out)
        for sc in out.scheduled:
            if sc.samples:
                sc.seq.output.append(new_token)
        if len(seq.output) >= 3:
            s.finish(seq, "length")
            return
    raise AssertionError("the sequence never finished")


def test_waiting_for_remote_kv_holds_blocks_and_is_never_scheduled() -> None:
    s = _sched()
    seq = _seq("r", 10)  # 3 blocks
    blocks = s.add_remote(seq)
    assert len(blocks) == 3 and seq.status is Status.WAITING_FOR_REMOTE_KV
    assert s.blocks.pool.num_free == 13
    for _ in range(3):
        out = s.schedule()
        assert out.scheduled == [] and seq.num_computed == 0
    s.remote_kv_landed(seq)  # the fake transfer completed
    seq.output.append(5)  # its first token came with the KV
    assert seq.status is Status.RUNNING and seq.num_computed == 10
    out = s.schedule()
    assert [(x.seq, x.num_tokens) for x in out.decodes] == [(seq, 1)]
    s.advance(out)
    s.finish(seq, "stop")
    assert_scheduler_empty(s)


def test_a_local_prompt_runs_next_to_a_remote_wait() -> None:
    s = _sched()
    remote, local = _seq("r", 10), _seq("l", 6, base=500)
    s.add_remote(remote)
    s.add(local)
    out = s.schedule()
    assert [x.seq for x in out.prefills] == [local]
    s.advance(out)
    local.output.append(1)
    s.remote_kv_landed(remote)
    remote.output.append(2)
    out = s.schedule()
    assert {x.seq.request_id for x in out.decodes} == {"l", "r"}
    s.advance(out)
    s.finish(local, "stop")
    s.finish(remote, "stop")
    assert_scheduler_empty(s)


def test_failed_transfer_requeues_the_prompt_for_local_compute() -> None:
    s = _sched()
    seq = _seq("r", 10)
    s.add_remote(seq)
    s.remote_kv_failed(seq)  # the fake transfer failed
    assert seq.status is Status.WAITING and not seq.block_table
    assert s.blocks.pool.num_free == 16
    out = s.schedule()
    assert [(x.seq, x.num_tokens) for x in out.prefills] == [(seq, 10)]
    _run_to_end(s, seq)
    assert_scheduler_empty(s)


@pytest.mark.parametrize("where", ["waiting_for_kv", "after_landing"])
def test_abort_frees_the_blocks(where: str) -> None:
    s = _sched()
    seq = _seq("r", 10)
    s.add_remote(seq)
    if where == "after_landing":
        s.remote_kv_landed(seq)
        seq.output.append(3)
    s.finish(seq, "abort")
    assert seq.finish_reason == "abort"
    with pytest.raises(KeyError):
        s.remote_kv_landed(seq)  # a late completion finds nothing
    assert_scheduler_empty(s)


def test_out_of_blocks_holds_nothing_and_a_duplicate_is_refused() -> None:
    s = _sched(num_blocks=4)
    first = _seq("a", 10)  # 3 of 4 blocks
    s.add_remote(first)
    with pytest.raises(OutOfBlocksError):
        s.add_remote(_seq("b", 10, base=300))
    assert s.blocks.pool.num_free == 1 and list(s.remote) == ["a"]
    with pytest.raises(ValueError, match="request_id"):
        s.add_remote(_seq("a", 5))
    s.finish(first, "abort")
    assert_scheduler_empty(s)


def test_a_cached_prefix_is_reused_and_only_the_rest_is_received() -> None:
    s = _sched()
    warm = _seq("warm", 10)  # computes blocks 0..1 fully: they go to the prefix cache
    s.add(warm)
    _run_to_end(s, warm)
    seq = _seq("r", 14)  # the same first 10 tokens, then more: 4 blocks
    pool = s.blocks.pool
    cached = [pool.lookup(h) for h in seq.block_hashes(8)]
    assert None not in cached
    blocks = s.add_remote(seq, first_block=2)
    assert seq.block_table[:2] == cached and seq.block_table[2:] == blocks
    assert len(blocks) == 2 and seq.num_cached_prompt_tokens == 8
    s.remote_kv_landed(seq)
    seq.output.append(9)
    s.finish(seq, "stop")
    assert_scheduler_empty(s)


def test_a_prefix_that_is_not_cached_is_refused() -> None:
    s = _sched()
    with pytest.raises(OutOfBlocksError, match="leading blocks cached"):
        s.add_remote(_seq("r", 14), first_block=2)
    with pytest.raises(ValueError, match="first_block"):
        s.add_remote(_seq("q", 8), first_block=2)
    assert_scheduler_empty(s)


def test_preemption_never_takes_a_remote_wait() -> None:
    """Running sequences preempt each other; blocks held for remote KV stay put."""
    s = _sched(num_blocks=6, max_tokens=64)
    remote = _seq("r", 8)  # 2 blocks
    s.add_remote(remote)
    a, b = _seq("a", 7, base=200), _seq("b", 7, base=400)  # 2 blocks each
    s.add(a)
    s.add(b)
    out = s.schedule()
    s.advance(out)
    a.output.append(1)
    b.output.append(1)
    a.output.extend([1, 1])  # a needs a third block on its next step: b is preempted
    a.num_computed = a.num_tokens - 1
    out = s.schedule()
    assert [p.request_id for p in out.preempted] == ["b"]
    assert remote.status is Status.WAITING_FOR_REMOTE_KV and len(remote.block_table) == 2
    s.finish(a, "stop")
    s.finish(b, "abort")
    s.finish(remote, "abort")
    assert_scheduler_empty(s)
