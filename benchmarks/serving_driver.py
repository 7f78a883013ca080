"""The serving benchmark's load generator: open-loop streamed requests over gRPC, and
the CPU that the cluster and everything else on the host used meanwhile.

For one request rate, `run_rate` schedules every request at its arrival offset from a
common start, whether or not earlier ones have finished (open loop). Each request
streams through `AsyncClient` into a `StreamRecord`. The rate ends when every
request has finished or `deadline_s` after the last arrival; requests still running
then are cancelled (the server aborts them) and recorded as failed. `wait_idle` then
waits, bounded, until every instance reports no running sequences and no queued
prefill, so the next rate starts from an idle cluster.

`CpuMeter` reads /proc: the host's busy CPU time and that of this process's tree (the
benchmark client plus the local Ray it started: raylet, workers, replicas). Their
difference is what other processes on the host took, the noise to report with a run.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.slo import StreamRecord
from benchmarks.workload import Request
from cluster.client import AsyncClient, ClientError, Sampling

logger = logging.getLogger(__name__)


async def _one(client: AsyncClient, req: Request, rec: StreamRecord, timeout_s: float) -> None:
    sampling = Sampling(temperature=0.0, max_tokens=req.output_len, ignore_eos=True)
    rec.sent = time.perf_counter()
    try:
        async for chunk in client.stream(
            token_ids=req.prompt, sampling=sampling, timeout_s=timeout_s
        ):
            rec.chunk(len(chunk.token_ids))
            if chunk.timings is not None:
                t = chunk.timings
                rec.server = {
                    "queue_ms": t.queue_ms,
                    "prefill_ms": t.prefill_ms,
                    "kv_transfer_ms": t.kv_transfer_ms,
                    "ttft_ms": t.ttft_ms,
                    "mean_tpot_ms": t.mean_tpot_ms,
                    "disaggregated": t.disaggregated,
                }
            if chunk.finish_reason is not None:
                rec.finish()
    except ClientError as e:
        rec.fail(str(e))


async def run_rate(
    client: AsyncClient,
    requests: Sequence[Request],
    offsets: Sequence[float],
    *,
    request_timeout_s: float,
    deadline_s: float,
) -> list[StreamRecord]:
    """Send `requests` at `offsets` (seconds from now); one record per request."""
    records = [StreamRecord(len(r.prompt), r.output_len) for r in requests]
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def scheduled(i: int) -> None:
        await asyncio.sleep(max(0.0, start + offsets[i] - loop.time()))
        await _one(client, requests[i], records[i], request_timeout_s)

    tasks = [asyncio.create_task(scheduled(i)) for i in range(len(requests))]
    limit = (max(offsets, default=0.0) + deadline_s) - (loop.time() - start)
    _, pending = await asyncio.wait(tasks, timeout=max(0.0, limit))
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.gather(*pending, return_exceptions=True)
        logger.warning("%d requests unfinished at the rate's deadline", len(pending))
    for rec, task in zip(records, tasks, strict=True):
        if task in pending and rec.error is None:
            rec.fail(f"unfinished {deadline_s:.0f}s after the last arrival")
        elif not task.cancelled() and task.exception() is not None:
            rec.fail(f"client: {task.exception()!r}")
    return records


async def warm_up(client: AsyncClient, requests: Sequence[Request], timeout_s: float) -> None:
    """Untimed requests: one at a time, then all at once (first-call costs, batching)."""
    for req in requests[:1]:
        await _one(client, req, StreamRecord(len(req.prompt), req.output_len), timeout_s)
    await asyncio.gather(
        *(
            _one(client, r, StreamRecord(len(r.prompt), r.output_len), timeout_s)
            for r in requests[1:]
        )
    )


async def wait_idle(client: AsyncClient, timeout_s: float) -> bool:
    """Until no instance reports running sequences or queued prefill; False on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            state = await client.cluster_status(timeout_s=5.0)
        except ClientError:
            state = None
        if state is not None:
            loads = [i.load for p in state.pools for i in p.instances]
            if all(
                load is not None and load.running_seqs == 0 and load.queued_prefill_tokens == 0
                for load in loads
            ):
                return True
        await asyncio.sleep(0.5)
    return False


# ---- host CPU ---------------------------------------------------------------------


@dataclass(frozen=True)
class CpuReading:
    wall: float
    host_busy_s: float  # every CPU, from /proc/stat (idle and iowait excluded)
    tree_s: float  # this process and its descendants


@dataclass(frozen=True)
class CpuUse:
    """Average CPUs busy over an interval (2.0 = both cores of a 2-core host)."""

    ours: float  # this process tree: the client and the cluster
    others: float  # everything else on the host
    loadavg_1m: float

    def as_json(self) -> dict[str, float]:
        return {"ours": self.ours, "others": self.others, "loadavg_1m": self.loadavg_1m}


class CpuMeter:
    def __init__(self) -> None:
        self._tick = os.sysconf("SC_CLK_TCK")
        self._began = self.read()

    def read(self) -> CpuReading:
        return CpuReading(time.perf_counter(), self._host_busy(), self._tree())

    def restart(self) -> None:
        self._began = self.read()

    def use(self) -> CpuUse:
        now = self.read()
        wall = max(1e-9, now.wall - self._began.wall)
        ours = (now.tree_s - self._began.tree_s) / wall
        host = (now.host_busy_s - self._began.host_busy_s) / wall
        return CpuUse(ours, max(0.0, host - ours), os.getloadavg()[0])

    def _host_busy(self) -> float:
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return 0.0
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
        return (user + nice + system + irq + softirq + steal) / self._tick

    def _tree(self) -> float:
        parent: dict[int, int] = {}
        cpu: dict[int, float] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue  # the process is gone
            pid = int(entry.name)
            parent[pid] = int(fields[1])
            cpu[pid] = (int(fields[11]) + int(fields[12])) / self._tick  # utime + stime
        root = os.getpid()
        total = 0.0
        for pid, seconds in cpu.items():
            p, hops = pid, 0
            while p not in (root, 0, 1) and hops < 64:
                p, hops = parent.get(p, 0), hops + 1
            if p == root:
                total += seconds
        return total
