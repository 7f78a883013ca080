"""Continuous batching with chunked prefill under a per-step token budget.

Each step: running decodes go first (one token each), then running prompts continue
their chunks, then waiting requests are admitted in arrival order while the token
budget, `max_num_seqs` and free blocks allow. When a running sequence cannot get a
block, the most recently admitted running sequence is preempted by recompute: its
blocks are freed and it goes back to the head of the waiting queue. Its recompute
starts after the leading full blocks it computed that are still intact: found by
prefix hash, or, without prefix caching, taken back if not handed out since (blocks
pinned for a transfer, say).

`schedule()` is side-effect free on the cache contents; it only moves sequences
between queues and grows block tables. The engine reports what the step computed
through `advance()`.

On a decode instance of a disaggregated cluster, a prompt that a prefill instance
computes waits in a third queue, `remote`:

    add_remote(seq, first_block)   blocks for the whole prompt now (its first
                                   `first_block` blocks from the prefix cache): the
                                   transfer's destination. WAITING_FOR_REMOTE_KV; never
                                   scheduled while there
    remote_kv_landed(seq)          the KV is in: the prompt counts as computed and the
                                   sequence joins the running batch (its first token
                                   comes with the transfer)
    remote_kv_failed(seq)          its blocks are freed and it queues as WAITING, to
                                   compute the prompt here
    finish(seq, ...)               as for any sequence: its blocks are freed

Invariant: only running sequences and sequences waiting for remote KV hold blocks, so
a queue of waiting requests can never starve the pool.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
from engine.block_pool import OutOfBlocksError
from engine.sequence import Sequence, Status


@dataclass(frozen=True)
class ScheduledSeq:
    seq: Sequence
    num_tokens: int  # tokens to compute this step, starting at seq.num_computed

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the sequence, so a token is sampled."""
        return self.seq.num_computed + self.num_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    decodes: list[ScheduledSeq]
    prefills: list[ScheduledSeq]
    preempted: list[Sequence]

    @property
    def scheduled(self) -> list[ScheduledSeq]:
        return self.decodes + self.prefills

    @property
    def num_tokens(self) -> int:
        return sum(s.num_tokens for s in self.scheduled)


class Scheduler:
    def __init__(
        self, blocks: BlockManager, max_num_batched_tokens: int, max_num_seqs: int
    ) -> None:
        self.blocks = blocks
        self.max_tokens = max_num_batched_tokens
        self.max_seqs = max_num_seqs
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.remote: dict[str, Sequence] = {}  # waiting for remote KV, by request id
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def add_remote(self, seq: Sequence, first_block: int = 0) -> list[int]:
        """Hold blocks for `seq`'s whole prompt, whose KV another instance sends; the
        blocks it receives (prompt blocks `first_block...`). The first `first_block`
        blocks must be in the prefix cache here. Raises OutOfBlocksError, holding
        nothing, when the pool cannot hold the prompt now or the prefix is not cached."""
        if seq.request_id in self.remote:
            raise ValueError(f"request_id {seq.request_id!r} already waits for remote KV")
        n_prompt = len(seq.prompt)
        if first_block:
            if first_block * self.blocks.block_size >= n_prompt:
                raise ValueError(f"first_block {first_block} leaves no prompt block to send")
            self.blocks.match_prefix(seq)
            if len(seq.block_table) < first_block:
                cached = len(seq.block_table)
                self.blocks.free(seq)
                raise OutOfBlocksError(f"{cached} of the {first_block} leading blocks cached")
            self.blocks.pool.release(reversed(seq.block_table[first_block:]))
            del seq.block_table[first_block:]
            seq.num_published_blocks = first_block
        if not self.blocks.grow(seq, n_prompt):
            need = self.blocks.blocks_for(n_prompt) - len(seq.block_table)
            self.blocks.free(seq)
            raise OutOfBlocksError(f"{need} blocks needed, {self.blocks.pool.num_free} free")
        seq.num_computed = 0
        seq.num_cached_prompt_tokens = first_block * self.blocks.block_size
        seq.status = Status.WAITING_FOR_REMOTE_KV
        self.remote[seq.request_id] = seq
        return seq.block_table[first_block:]

    def remote_kv_landed(self, seq: Sequence) -> None:
        """The prompt's KV is in the blocks: the sequence runs from its first token."""
        self._take_remote(seq)
        if seq.timings.first_scheduled is None:
            seq.timings.first_scheduled = time.monotonic()
        seq.num_computed = len(seq.prompt)
        self.blocks.cache_full_blocks(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)

    def remote_kv_failed(self, seq: Sequence) -> None:
        """The KV will not come: free the blocks and compute the prompt here."""
        self._take_remote(seq)
        self.blocks.free(seq)
        self.add(seq)

    def _take_remote(self, seq: Sequence) -> None:
        if self.remote.get(seq.request_id) is not seq:
            raise KeyError(f"{seq.request_id!r} is not waiting for remote KV")
        del self.remote[seq.request_id]

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []
        preempted: list[Sequence] = []
        chosen: set[int] = set()
        # Decodes before prompt chunks; within each, admission order.
        order = sorted(self.running, key=lambda s: s.is_prefill)
        for seq in order:
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:
                continue  # preempted earlier in this loop
            n = min(seq.num_tokens - seq.num_computed, budget)
            while not self.blocks.grow(seq, seq.num_computed + n):
                victim = next((s for s in reversed(self.running) if id(s) not in chosen), None)
                assert victim is not None
                self._preempt(victim)
                preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not Status.RUNNING:
                continue
            chosen.add(id(seq))
            (prefills if seq.is_prefill else decodes).append(ScheduledSeq(seq, n))
            budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_seqs and not preempted:
            seq = self.waiting[0]
            self.blocks.match_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self.blocks.grow(seq, seq.num_computed + n):
                # Waiting sequences hold no blocks: give back the prefix just matched
                # (it stays cached) and wait for running sequences to free some.
                self.blocks.free(seq)
                break
            self.waiting.popleft()
            if seq.timings.first_scheduled is None:
                seq.timings.first_scheduled = time.monotonic()
                seq.num_cached_prompt_tokens = seq.num_computed
            seq.status = Status.RUNNING
            self.running.append(seq)
            chosen.add(id(seq))
            prefills.append(ScheduledSeq(seq, n))
            budget -= n
        return SchedulerOutput(decodes, prefills, preempted)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.preempt(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def advance(self, out: SchedulerOutput) -> None:
        """Record that the step computed its scheduled tokens."""
        for s in out.scheduled:
            s.seq.num_computed += s.num_tokens
            self.blocks.cache_full_blocks(s.seq)

    def finish(self, seq: Sequence, reason: str) -> None:
        """Remove a sequence from every queue and free its blocks (idempotent)."""
        if seq.status is Status.FINISHED:
            return
        if seq.status is Status.RUNNING:
            self.running.remove(seq)
        elif seq.status is Status.WAITING:
            self.waiting.remove(seq)
        elif seq.status is Status.WAITING_FOR_REMOTE_KV:
            self._take_remote(seq)
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.timings.finished = time.monotonic()
