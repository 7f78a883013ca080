"""One simulated engine replica: its queues and the step its scheduler would run next.

A request's job moves through a replica as it does through the engine:

    waiting (prompt tokens left to prefill, FCFS) -> [prefill role] handed to the KV
    transfer after its last chunk
                                                  -> [decode/colocated] running
    arrived (KV and first token came from a prefill replica) -> running
    running (one token per step) -> finished

A step takes every running sequence for one decode token first, then prompt chunks
from the head of `waiting` under the token budget (`max_batched_tokens`, of which each
decode token uses one), admitting a new prompt only while the replica holds fewer than
`max_num_seqs` sequences. A prefill replica runs prompt chunks only. With
`mixed_steps` off (engines without chunked prefill, such as vLLM before it had it), a
step with prompts waiting prefills only them, and running sequences wait. The step's
length comes from the replica's `StepCost`. `plan` changes nothing but admitting
arrived sequences; `finish`, called once with the step's end time, applies the step.
A simulator runs one step at a time on a replica: `start` plans it and holds it as the
running `step`, `end` finishes it.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from enum import Enum

from planner.costs import StepCost
from planner.workload import SimRequest


class Role(Enum):
    PREFILL = "prefill"
    DECODE = "decode"
    COLOCATED = "colocated"


@dataclass
class Job:
    index: int
    req: SimRequest
    prefilled: int  # prompt tokens whose KV exists (the cached prefix to start with)
    decode_replica: int = -1  # disaggregated: where the KV goes
    first_token: float = math.nan
    last_token: float = math.nan
    generated: int = 0
    local_prefill: bool = True

    @property
    def prompt_left(self) -> int:
        return self.req.prompt_tokens - self.prefilled

    @property
    def context(self) -> int:
        return self.req.prompt_tokens + self.generated

    def first_token_at(self, now: float) -> bool:
        """The first token came at `now` (with the last prompt chunk); True when it is
        also the last."""
        self.first_token = self.last_token = now
        self.generated = 1
        return self.req.output_tokens <= 1


@dataclass
class Step:
    chunks: list[tuple[Job, int]]
    decodes: list[Job]
    seconds: float


@dataclass
class Replica:
    index: int
    role: Role
    cost: StepCost
    max_batched_tokens: int
    max_num_seqs: int
    mixed_steps: bool = True  # False: a step prefills only, or decodes only (prefill first)
    waiting: deque[Job] = field(default_factory=deque)
    arrived: deque[Job] = field(default_factory=deque)
    running: list[Job] = field(default_factory=list)
    step: Step | None = None  # the step running now
    assigned: int = 0  # sequences routed here and not finished (routing load)
    busy_seconds: float = 0.0

    @property
    def queued_tokens(self) -> int:
        return sum(j.prompt_left for j in self.waiting)

    def plan(self) -> Step | None:
        """The next step, or None when there is nothing to run."""
        if self.role is not Role.PREFILL:
            while self.arrived and self._seqs() < self.max_num_seqs:
                self.running.append(self.arrived.popleft())
        decodes = list(self.running)
        if self.mixed_steps:
            chunks = self._chunks(self.max_batched_tokens - len(decodes))
        else:  # prompts first, alone; decodes when no prompt can start
            chunks = self._chunks(self.max_batched_tokens)
            if chunks:
                decodes = []
        if not chunks and not decodes:
            return None
        context = sum(j.context for j in decodes)
        seconds = self.cost.step([(k, j.prefilled) for j, k in chunks], len(decodes), context)
        return Step(chunks, decodes, seconds)

    def start(self) -> Step | None:
        """Plan the next step and hold it as running, unless one runs already or there
        is nothing to run: the step started, or None."""
        if self.step is not None:
            return None
        self.step = self.plan()
        return self.step

    def end(self, now: float) -> tuple[list[Job], list[Job]]:
        """The running step ended at `now`: `finish` it."""
        step, self.step = self.step, None
        assert step is not None
        return self.finish(step, now)

    def land(self, job: Job, now: float) -> bool:
        """A job whose KV and first token came from a prefill replica at `now`: True
        when that token was its last, else it waits in `arrived` to join the batch."""
        if job.first_token_at(now):
            return True
        self.arrived.append(job)
        return False

    def _chunks(self, budget: int) -> list[tuple[Job, int]]:
        """Prompt chunks from the head of the queue under `budget` tokens."""
        chunks: list[tuple[Job, int]] = []
        held = len(self.running)  # seats, taken whether or not they decode this step
        for job in self.waiting:
            if budget <= 0 or held >= self.max_num_seqs:  # part-prefilled ones lead
                break
            k = min(job.prompt_left, budget)
            chunks.append((job, k))
            budget -= k
            held += 1
        return chunks

    def _seqs(self) -> int:
        partial = sum(1 for j in self.waiting if j.prefilled > j.req.cached_tokens)
        return len(self.running) + partial

    def finish(self, step: Step, now: float) -> tuple[list[Job], list[Job]]:
        """Apply `step`, ended at `now`: (jobs whose prompt is done, finished jobs)."""
        self.busy_seconds += step.seconds
        finished: list[Job] = []
        for job in step.decodes:
            job.generated += 1
            job.last_token = now
            if job.generated >= job.req.output_tokens:
                finished.append(job)
        done_ids = {id(j) for j in finished}
        self.running = [j for j in self.running if id(j) not in done_ids]
        prefilled: list[Job] = []
        for job, k in step.chunks:
            job.prefilled += k
            if job.prompt_left == 0:
                prefilled.append(job)
        if prefilled:
            gone = {id(j) for j in prefilled}
            self.waiting = deque(j for j in self.waiting if id(j) not in gone)
        for job in prefilled:  # the first token comes from the last prompt chunk
            if self.keeps(job):
                if job.first_token_at(now):
                    finished.append(job)
                else:
                    self.running.append(job)
        return prefilled, finished

    def keeps(self, job: Job) -> bool:
        """Whether a job whose prompt completed here decodes here too (otherwise its
        KV goes to its decode replica)."""
        return self.role is not Role.PREFILL
