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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from planner.costs import ZERO_TRANSFER, StepCost, TransferCost
from planner.events import ARRIVAL, KV, STEP, Events, sim_result
from planner.layout import Layout
from planner.metrics import SimResult
from planner.replica import Job, Replica, Role
from planner.workload import SimRequest


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
        self.events = Events(requests)
        self.jobs: list[Job | None] = [None] * len(requests)
        self.done: list[Job | None] = [None] * len(requests)

    def run(self) -> list[Job]:
        while self.events:
            t, kind, a, b = self.events.pop()
            if kind == ARRIVAL:
                self.arrive(a, t)
            elif kind == STEP:
                self.step_done(a, b, t)
            else:
                self.landed(a, t)
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
        step = replica.start()
        if step is not None:
            self.events.push(t + step.seconds, STEP, pool, replica.index)

    def step_done(self, pool: int, index: int, t: float) -> None:
        replica = (self.gen, self.pre)[pool][index]
        prefilled, finished = replica.end(t)
        for job in finished:
            self.finish(job, replica)
        if pool == 1:
            for job in prefilled:
                nbytes = job.req.prompt_tokens * self.model.kv_bytes_per_token
                self.events.push(t + self.model.transfer.time(nbytes), KV, job.index)
        self.kick(replica, pool, t)

    def landed(self, i: int, t: float) -> None:
        job = self.jobs[i]
        assert job is not None
        dest = self.gen[job.decode_replica]
        if dest.land(job, t):
            self.finish(job, dest)
        else:
            self.kick(dest, 0, t)

    def finish(self, job: Job, replica: Replica) -> None:
        replica.assigned -= 1
        self.done[job.index] = job


def simulate(layout: Layout, model: ClusterModel, requests: Sequence[SimRequest]) -> SimResult:
    """Replay `requests` (sorted by arrival) on `layout`; per-request timings."""
    return sim_result(_Sim(layout, model, requests).run())
