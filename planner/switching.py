"""The simulator with switchable replicas and the controller's policy in the loop.

    run = simulate_switching(setup, requests, policy)

Every replica is one engine that can do both roles, as a `dual_worker` replica is: it
decodes what it holds, prefills its local prompts, and prefills prompts for other
replicas, whose KV then travels `transfer(bytes)` to them. Which new requests a
replica gets depends on its routed role, as in the router: a decode-role replica gets
decode requests (and prefills those below the threshold itself), a prefill-role one
gets remote prefills. A flip changes only that; what a replica already holds finishes
there.

Every `period_s` the policy (`controller.policy.Policy`, the same object the
controller runs) observes what the controller would read: each replica's queued prompt
tokens and running sequences, and the routers' demand over the period (arrivals, the
mean queue time of the remotely prefilled requests whose first token came, the mean
TPOT of the requests that finished). Its flips change the routed
roles and its threshold moves change the router's threshold, at once. Without a
policy the roles and threshold stay fixed: a fixed layout on the same engines.

Queue time is what the router reports, TTFT less the prompt's prefill time and KV
transfer; here the prefill time of the prompt alone on an idle replica stands for the
compute share.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from controller.policy import Action, ActionKind, Demand, InstanceLoad, Observation, Policy
from planner.costs import ZERO_TRANSFER, StepCost, TransferCost
from planner.events import ARRIVAL, KV, STEP, Events, sim_result
from planner.metrics import SimResult
from planner.replica import Job, Replica, Role
from planner.workload import SimRequest
from registry.types import Role as RoutedRole

_TICK = 3  # the controller's fast period
PREFILL_POOL, DECODE_POOL = "prefill", "decode"


class DualReplica(Replica):
    """A replica that keeps the jobs it decodes and ships the others' KV."""

    def keeps(self, job: Job) -> bool:
        return job.local_prefill or job.decode_replica == self.index


@dataclass(frozen=True)
class SwitchingSetup:
    replicas: int
    prefill: int  # replicas that start in the prefill role
    cost: StepCost
    threshold: int
    max_batched_tokens: int = 2048
    max_num_seqs: int = 64
    transfer: TransferCost = ZERO_TRANSFER
    kv_bytes_per_token: int = 0
    period_s: float = 2.0  # the controller's fast period

    def __post_init__(self) -> None:
        if not 1 <= self.prefill < self.replicas:
            raise ValueError("need at least one replica in each role")

    def describe(self) -> str:
        return f"{self.prefill}P{self.replicas - self.prefill}D threshold {self.threshold}"


@dataclass
class SwitchingRun:
    result: SimResult
    actions: list[Action] = field(default_factory=list)

    @property
    def flips(self) -> list[Action]:
        return [a for a in self.actions if a.kind in (ActionKind.FLIP, ActionKind.REPAIR)]


class _Sim:
    def __init__(
        self, setup: SwitchingSetup, requests: Sequence[SimRequest], policy: Policy | None
    ) -> None:
        self.s, self.requests, self.policy = setup, requests, policy
        self.reps = [
            DualReplica(i, Role.DECODE, setup.cost, setup.max_batched_tokens, setup.max_num_seqs)
            for i in range(setup.replicas)
        ]
        self.home = [
            RoutedRole.PREFILL if i < setup.prefill else RoutedRole.DECODE
            for i in range(setup.replicas)
        ]
        self.routed = list(self.home)
        self.threshold = setup.threshold
        self.events = Events(requests)
        self.jobs: list[Job | None] = [None] * len(requests)
        self.left = len(requests)
        self.actions: list[Action] = []
        self.firsts: list[Job] = []  # first token since the last tick
        self.done: list[Job] = []  # finished since the last tick
        self.arrived = 0

    def run(self) -> list[Job]:
        if self.policy is not None:
            self.events.push(self.s.period_s, _TICK, 0)
        while self.events:
            t, kind, a, _ = self.events.pop()
            if kind == ARRIVAL:
                self.arrive(a, t)
            elif kind == STEP:
                self.step_done(a, t)
            elif kind == KV:
                self.landed(a, t)
            elif self.left:
                self.tick(t)
                self.events.push(t + self.s.period_s, _TICK, 0)
        if self.left:
            raise RuntimeError(f"simulation ended with {self.left} requests unfinished")
        return [j for j in self.jobs if j is not None]

    def arrive(self, i: int, t: float) -> None:
        req = self.requests[i]
        job = Job(i, req, req.cached_tokens)
        self.jobs[i] = job
        self.arrived += 1
        decode = [r for r in self.reps if self.routed[r.index] is RoutedRole.DECODE]
        dest = min(decode, key=lambda r: (r.assigned, r.index))
        dest.assigned += 1
        job.decode_replica = dest.index
        prefill = [r for r in self.reps if self.routed[r.index] is RoutedRole.PREFILL]
        if prefill and req.uncached_tokens >= self.threshold:
            job.local_prefill = False
            src = min(prefill, key=lambda r: (r.queued_tokens, r.index))
            src.waiting.append(job)
            self.kick(src, t)
        else:
            dest.waiting.append(job)
            self.kick(dest, t)

    def kick(self, replica: Replica, t: float) -> None:
        step = replica.start()
        if step is not None:
            self.events.push(t + step.seconds, STEP, replica.index)

    def step_done(self, index: int, t: float) -> None:
        replica = self.reps[index]
        prefilled, finished = replica.end(t)
        for job in prefilled:
            if replica.keeps(job):
                self.firsts.append(job)
            else:
                nbytes = job.req.prompt_tokens * self.s.kv_bytes_per_token
                self.events.push(t + self.s.transfer.time(nbytes), KV, job.index)
        for job in finished:
            self.finish(job)
        self.kick(replica, t)

    def landed(self, i: int, t: float) -> None:
        job = self.jobs[i]
        assert job is not None
        dest = self.reps[job.decode_replica]
        self.firsts.append(job)
        if dest.land(job, t):
            self.finish(job)
        else:
            self.kick(dest, t)

    def finish(self, job: Job) -> None:
        self.reps[job.decode_replica].assigned -= 1
        self.left -= 1
        self.done.append(job)

    # -- the controller -----------------------------------------------------------------

    def tick(self, t: float) -> None:
        assert self.policy is not None
        obs = Observation(t, self._instances(), self._demand())
        for action in self.policy.fast(obs):
            self.actions.append(action)
            if action.kind in (ActionKind.FLIP, ActionKind.REPAIR):
                assert action.to_role is not None
                self.routed[int(action.instance_id.removeprefix("r"))] = action.to_role
            elif action.kind is ActionKind.THRESHOLD:
                self.threshold = self.policy.threshold

    def _instances(self) -> tuple[InstanceLoad, ...]:
        return tuple(
            InstanceLoad(
                instance_id=f"r{r.index}",
                pool=PREFILL_POOL if self.home[r.index] is RoutedRole.PREFILL else DECODE_POOL,
                home=self.home[r.index],
                role=self.routed[r.index],
                switchable=True,
                queued_prefill_tokens=r.queued_tokens,
                running_seqs=len(r.running) + len(r.arrived),
            )
            for r in self.reps
        )

    def _demand(self) -> Demand:
        firsts, self.firsts = self.firsts, []
        done, self.done = self.done, []
        queue = [
            max(
                0.0,
                j.first_token
                - j.req.arrival
                - self.s.cost.prefill.prompt(j.req.uncached_tokens)
                - (
                    0.0
                    if j.local_prefill
                    else self.s.transfer.time(j.req.prompt_tokens * self.s.kv_bytes_per_token)
                ),
            )
            for j in firsts
            if not j.local_prefill
        ]
        tpots = [
            (j.last_token - j.first_token) / (j.req.output_tokens - 1)
            for j in done
            if j.req.output_tokens > 1
        ]
        arrived, self.arrived = self.arrived, 0
        return Demand(
            interval_s=self.s.period_s,
            arrived=arrived,
            finished=len(done),
            mean_remote_queue_s=sum(queue) / len(queue) if queue else None,
            mean_tpot_s=sum(tpots) / len(tpots) if tpots else None,
        )


def simulate_switching(
    setup: SwitchingSetup, requests: Sequence[SimRequest], policy: Policy | None = None
) -> SwitchingRun:
    """Replay `requests` (sorted by arrival) on `setup`, under `policy` if given."""
    sim = _Sim(setup, requests, policy)
    return SwitchingRun(sim_result(sim.run()), sim.actions)
