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
between queues and grows block tables. Invariant: only running sequences hold
blocks, so a queue of waiting requests can never starve the pool. The engine
reports what the step computed through `advance()`.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

from engine.block_manager import BlockManager
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
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def join_running(self, seq: Sequence) -> None:
        """Add a sequence whose prompt is already in the cache (remote prefill)."""
        seq.status = Status.RUNNING
        self.running.append(seq)

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
        self.blocks.free(seq)
        seq.status = Status.FINISHED
        seq.finish_reason = reason
        seq.timings.finished = time.monotonic()
