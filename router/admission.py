"""Admission control: a bound on the requests one router replica holds at once.

Beyond it new requests are refused at once (RESOURCE_EXHAUSTED / HTTP 429) rather than
queued without limit; the engines' own schedulers queue what was admitted.

`Demand` counts what the router saw, refusals included, for the controller
(`registry.routing`).
"""

from __future__ import annotations

import time

from registry import AdmissionReport
from router.results import Finish


class Admission:
    def __init__(self, max_inflight: int) -> None:
        if max_inflight < 1:
            raise ValueError("max_inflight must be >= 1")
        self.max_inflight = max_inflight
        self.inflight = 0

    def try_acquire(self) -> bool:
        """Called on the event loop only, so no lock is needed."""
        if self.inflight >= self.max_inflight:
            return False
        self.inflight += 1
        return True

    def release(self) -> None:
        if self.inflight <= 0:
            raise RuntimeError("released more often than acquired")
        self.inflight -= 1


class Demand:
    """What one router replica saw, counted since it started, for the controller: every
    arrival (refused ones too, so backpressure does not hide demand), the refusals for
    capacity, and the finished requests' queue time, TTFT and TPOT. Updated on the
    event loop; `report` may run on another thread (it reads plain ints and floats)."""

    def __init__(self, router_id: str) -> None:
        self.router_id = router_id
        self.started = time.time()
        self.arrived = 0
        self.refused = 0
        self.finished = 0
        self.failed = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.queue_s = 0.0
        self.remote_queue_s = 0.0
        self.remote_count = 0
        self.ttft_s = 0.0
        self.tpot_s = 0.0
        self.tpot_count = 0

    def done(self, finish: Finish) -> None:
        t = finish.timings
        self.finished += 1
        self.prompt_tokens += finish.usage.prompt_tokens
        self.completion_tokens += finish.usage.completion_tokens
        self.queue_s += t.queue_ms / 1000
        if t.disaggregated:
            self.remote_queue_s += t.queue_ms / 1000
            self.remote_count += 1
        self.ttft_s += t.ttft_ms / 1000
        if finish.usage.completion_tokens > 1:
            self.tpot_s += t.mean_tpot_ms / 1000
            self.tpot_count += 1

    def report(self, inflight: int) -> AdmissionReport:
        return AdmissionReport(
            router_id=self.router_id,
            started=self.started,
            ts=time.time(),
            arrived=self.arrived,
            refused=self.refused,
            finished=self.finished,
            failed=self.failed,
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            queue_s=self.queue_s,
            remote_queue_s=self.remote_queue_s,
            remote_count=self.remote_count,
            ttft_s=self.ttft_s,
            tpot_s=self.tpot_s,
            tpot_count=self.tpot_count,
            inflight=inflight,
        )
