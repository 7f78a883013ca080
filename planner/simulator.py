"""A discrete-event simulator of the whole cluster, in the style of DistServe's.

    result = simulate(layout, model, requests)

Events, in time order (ties in the order they were scheduled):

* arrival: the router picks replicas as pdserve's router does. Colocated: the replica
  holding the fewest sequences. Disaggregated: a prompt whose uncached part is below
  `layout.threshold` goes to the decode replica with the fewest sequences, which
  prefills it itself; a longer one goes to the prefill replica with the fewest queued
  prompt tokens, and its decode replica (fewest sequences) is chosen at once, as the
  router sends both requests together.
* step end: a replica finishes the step its scheduler planned (`planner.replica`);
  decode tokens are emitted, prompt chunks advance, and it plans its next step.
* KV done: a prompt prefilled remotely reaches its decode replica `transfer(bytes)`
  after its last chunk, with its first token; the client sees that token then.

Transfers are independent of one another (no link contention) and a decode replica's
KV capacity is not modelled beyond `max_num_seqs`. Deterministic: no randomness here;
the workload's seed fixes everything.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from planner.costs import ZERO_TRANSFER, StepCost, TransferCost
from planner.layout import Layout
from planner.metrics import RequestTiming, SimResult
from planner.replica import Job, Replica, Role, Step
from planner.workload import SimRequest

_ARRIVAL, _STEP, _KV = 0, 1, 2


@dataclass(frozen=True)
class ClusterModel:
    """What a replica of each TP/PP shape costs, and what moving KV costs."""

    step_cost: Callable[[int, int], StepCost]  # (tp, pp) -> StepCost
    transfer: TransferCost = ZERO_TRANSFER
    kv_bytes_per_token: int = 0


class _Sim:
    def __init__(self, layout: Layout, model: ClusterModel, requests: Sequence[SimRequest]):
        self.layout, self.model, self.requests = layout, model, requests
        gen = layout.generating
        role = Role.COLOCATED if layout.colocated else Role.DECODE
        cost = model.step_cost(gen.tp, gen.pp)
        self.gen = [
            Replica(
                i, role, cost, layout.max_batched_tokens, layout.max_num_seqs, layout.mixed_steps
            )
            for i in range(gen.replicas)
        ]
        self.pre: list[Replica] = []
        if layout.prefill is not None:
            pcost = model.step_cost(layout.prefill.tp, layout.prefill.pp)
            self.pre = [
                Replica(i, Role.PREFILL, pcost, layout.prefill_budget, layout.max_num_seqs)
                for i in range(layout.prefill.replicas)
            ]
        self.heap: list[tuple[float, int, int, int, int]] = []
        self.order = 0
        self.steps: dict[tuple[int, int], Step] = {}  # (pool, replica) -> running step
        self.jobs: list[Job | None] = [None] * len(requests)
        self.done: list[Job | None] = [None] * len(requests)

    def push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        heapq.heappush(self.heap, (t, self.order, kind, a, b))
        self.order += 1

    def run(self) -> list[Job]:
        for i, r in enumerate(self.requests):
            self.push(r.arrival, _ARRIVAL, i)
        while self.heap:
            t, _, kind, a, b = heapq.heappop(self.heap)
            if kind == _ARRIVAL:
                self.arrive(a, t)
            elif kind == _STEP:
                self.step_done(a, b, t)
            else:
                job = self.jobs[a]
                assert job is not None
                dest = self.gen[job.decode_replica]
                job.first_token = job.last_token = t
                job.generated = 1
                if job.req.output_tokens <= 1:
                    self.finish(job, dest)
                else:
                    dest.arrived.append(job)
                    self.kick(dest, 0, t)
        missing = [i for i, j in enumerate(self.done) if j is None]
        if missing:
            raise RuntimeError(f"simulation ended with {len(missing)} requests unfinished")
        return [j for j in self.done if j is not None]

    def arrive(self, i: int, t: float) -> None:
        req = self.requests[i]
        job = Job(i, req, req.cached_tokens)
        self.jobs[i] = job
        dest = min(self.gen, key=lambda r: (r.assigned, r.index))
        dest.assigned += 1
        if self.pre and req.uncached_tokens >= self.layout.threshold:
            job.local_prefill = False
            job.decode_replica = dest.index
            src = min(self.pre, key=lambda r: (r.queued_tokens, r.index))
            src.waiting.append(job)
            self.kick(src, 1, t)
        else:
            dest.waiting.append(job)
            self.kick(dest, 0, t)

    def kick(self, replica: Replica, pool: int, t: float) -> None:
        if replica.busy:
            return
        step = replica.plan()
        if step is None:
            return
        replica.busy = True
        self.steps[(pool, replica.index)] = step
        self.push(t + step.seconds, _STEP, pool, replica.index)

    def step_done(self, pool: int, index: int, t: float) -> None:
        replica = (self.gen, self.pre)[pool][index]
        step = self.steps.pop((pool, index))
        replica.busy = False
        prefilled, finished = replica.finish(step, t)
        for job in finished:
            self.finish(job, replica)
        if pool == 1:
            for job in prefilled:
                nbytes = job.req.prompt_tokens * self.model.kv_bytes_per_token
                self.push(t + self.model.transfer.time(nbytes), _KV, job.index)
        self.kick(replica, pool, t)

    def finish(self, job: Job, replica: Replica) -> None:
        replica.assigned -= 1
        self.done[job.index] = job


def simulate(layout: Layout, model: ClusterModel, requests: Sequence[SimRequest]) -> SimResult:
    """Replay `requests` (sorted by arrival) on `layout`; per-request timings."""
    jobs = _Sim(layout, model, requests).run()
    timings = [
        RequestTiming(
            arrival=j.req.arrival,
            ttft=j.first_token - j.req.arrival,
            tpot=(
                (j.last_token - j.first_token) / (j.req.output_tokens - 1)
                if j.req.output_tokens > 1
                else math.nan
            ),
            e2e=j.last_token - j.req.arrival,
            local_prefill=j.local_prefill,
        )
        for j in jobs
    ]
    return SimResult(timings)
