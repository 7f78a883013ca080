"""What both simulators (`planner.simulator`, `planner.switching`) run alike: the event
queue, and the per-request timings of the jobs a run finished.

Events pop in time order, ties in the order they were pushed. An event is a kind
(`ARRIVAL`, `STEP`, `KV`, or one a simulator adds) and up to two integers that the
simulator gives meaning to; the queue starts with one `ARRIVAL` per request, whose
first integer is the request's index.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence

from planner.metrics import RequestTiming, SimResult
from planner.replica import Job
from planner.workload import SimRequest

ARRIVAL, STEP, KV = 0, 1, 2


class Events:
    def __init__(self, requests: Sequence[SimRequest]) -> None:
        self._heap: list[tuple[float, int, int, int, int]] = []
        self._order = 0
        for i, r in enumerate(requests):
            self.push(r.arrival, ARRIVAL, i)

    def __bool__(self) -> bool:
        return bool(self._heap)

    def push(self, t: float, kind: int, a: int, b: int = 0) -> None:
        heapq.heappush(self._heap, (t, self._order, kind, a, b))
        self._order += 1

    def pop(self) -> tuple[float, int, int, int]:
        """The next event: (time, kind, a, b)."""
        t, _, kind, a, b = heapq.heappop(self._heap)
        return t, kind, a, b


def sim_result(jobs: Iterable[Job]) -> SimResult:
    """Each finished job's TTFT, TPOT and end-to-end time."""
    return SimResult(
        [
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
    )
