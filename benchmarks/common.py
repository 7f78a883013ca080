"""Measurement helpers the benchmarks share: timing statistics, memory bandwidth, host
facts, a meter of other processes' CPU use, operator profiles, targets and JSON output.

Timings are wall-clock (`time.perf_counter`). A `Timing` keeps all of its samples;
benchmarks report the median and the best (minimum), because on a shared machine
other processes only ever make a run slower. `other_cores` says how much they did.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

L3_BYTES = 32 << 20  # the largest last-level cache on the hosts we run on


@dataclass(frozen=True)
class Timing:
    """Seconds of repeated runs of one measurement."""

    samples: tuple[float, ...]

    def __post_init__(self) -> None:
        if not self.samples:
            raise ValueError("a Timing needs at least one sample")

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def best(self) -> float:
        return min(self.samples)

    def rate(self, amount: float) -> Rate:
        """`amount` per second, at the median and at the best sample."""
        return Rate(amount / self.median, amount / self.best)

    def as_json(self) -> dict[str, Any]:
        return {"median": self.median, "min": self.best, "samples": list(self.samples)}


@dataclass(frozen=True)
class Rate:
    median: float
    best: float


def measure(fn: Callable[[], object], repeats: int, warmup: int = 1) -> Timing:
    """Run `fn` `warmup` times untimed, then time `repeats` runs of it."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - began)
    return Timing(tuple(samples))


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with `n` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# ---- memory bandwidth ---------------------------------------------------------------


@dataclass(frozen=True)
class Bandwidth:
    """Bytes moved per run and the runs' times; GB/s are 1e9 bytes per second."""

    kind: str  # "read" (a reduction over the buffer) or "copy" (bytes copied)
    nbytes: int
    threads: int
    seconds: Timing

    @property
    def gbps(self) -> Rate:
        return self.seconds.rate(self.nbytes / 1e9)

    def as_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "nbytes": self.nbytes,
            "threads": self.threads,
            "gbps_median": self.gbps.median,
            "gbps_best": self.gbps.best,
            "seconds": self.seconds.as_json(),
        }


def read_bandwidth(nbytes: int = 1 << 30, threads: int = 2, repeats: int = 5) -> Bandwidth:
    """Read bandwidth: `sum()` over an fp32 buffer far larger than the last-level cache.

    A sum reads every byte once and writes nothing, so it is the bound for a kernel
    that streams weights (a decode step's matrix-vector products).
    """
    if nbytes < 8 * L3_BYTES:
        raise ValueError(f"nbytes ({nbytes}) must be at least 8x the L3 ({L3_BYTES})")
    buf = torch.ones(nbytes // 4, dtype=torch.float32)
    with torch_threads(threads), torch.inference_mode():
        seconds = measure(buf.sum, repeats, warmup=1)
    return Bandwidth("read", buf.nbytes, threads, seconds)


def memcpy_bandwidth(nbytes: int = 256 << 20, threads: int = 1, repeats: int = 5) -> Bandwidth:
    """Copy bandwidth: `dst.copy_(src)` of a buffer far larger than the caches.

    GB/s counts the bytes copied once (not read plus written), as memcpy benchmarks do.
    """
    src = torch.randint(0, 255, (nbytes,), dtype=torch.uint8)
    dst = torch.empty_like(src)
    with torch_threads(threads), torch.inference_mode():
        seconds = measure(lambda: dst.copy_(src), repeats, warmup=1)
    return Bandwidth("copy", nbytes, threads, seconds)


# ---- the host -----------------------------------------------------------------------


@dataclass(frozen=True)
class HostInfo:
    timestamp: str
    hostname: str
    machine: str
    cpu_model: str
    cpu_count: int | None
    cpus_usable: int
    memory_gib: float
    torch: str
    torch_threads: int
    python: str
    loadavg: tuple[float, float, float]
    packages: dict[str, str] = field(default_factory=dict)


def host_info(packages: tuple[str, ...] = ()) -> HostInfo:
    """Facts that decide how comparable two runs are; `loadavg` shows a busy host."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in packages:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return HostInfo(
        timestamp=datetime.now(UTC).isoformat(timespec="seconds"),
        hostname=platform.node(),
        machine=platform.machine(),
        cpu_model=_cpu_model(),
        cpu_count=os.cpu_count(),
        cpus_usable=len(os.sched_getaffinity(0)),
        memory_gib=os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
        torch=torch.__version__,
        torch_threads=torch.get_num_threads(),
        python=platform.python_version(),
        loadavg=os.getloadavg(),
        packages=versions,
    )


@dataclass(frozen=True)
class CpuSnapshot:
    """CPU time used so far by the whole host and by this process, at one moment."""

    wall: float
    host_busy_s: float  # all CPUs, from /proc/stat (idle and iowait excluded)
    self_s: float  # this process, all threads


def cpu_snapshot() -> CpuSnapshot:
    busy = 0.0
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:9]]
        user, nice, system, _idle, _iowait, irq, softirq, steal = ticks
        busy = (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError):
        pass
    t = os.times()
    return CpuSnapshot(time.perf_counter(), busy, t.user + t.system)


def other_cores(since: CpuSnapshot, until: CpuSnapshot | None = None) -> float:
    """CPUs that other processes kept busy on average between two snapshots.

    0 on a quiet host; on a 2-CPU host, 1.0 means another process took a whole core
    from a benchmark that wanted both. Resolution is a clock tick (10 ms).
    """
    until = until or cpu_snapshot()
    wall = until.wall - since.wall
    if wall <= 0 or not since.host_busy_s:
        return 0.0
    others = (until.host_busy_s - since.host_busy_s) - (until.self_s - since.self_s)
    return max(0.0, others / wall)


def wait_for_quiet(max_wait_s: float, threshold: float = 0.25, window_s: float = 5.0) -> float:
    """Wait until other processes use under `threshold` CPUs over a `window_s` window, or
    until `max_wait_s` has passed; returns the last window's figure."""
    deadline = time.monotonic() + max_wait_s
    while True:
        began = cpu_snapshot()
        time.sleep(window_s)
        busy = other_cores(began)
        if busy < threshold or time.monotonic() >= deadline:
            return busy


@dataclass(frozen=True)
class SourceState:
    """The commit measured, and the files under the measured paths that differ from it."""

    commit: str
    modified: tuple[str, ...]


def source_state(paths: tuple[str, ...]) -> SourceState:
    root = Path(__file__).resolve().parent.parent

    def git(*args: str) -> str:
        done = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, check=False, timeout=30
        )
        return done.stdout.strip() if done.returncode == 0 else ""

    status = git("status", "--porcelain", "--", *paths)
    return SourceState(
        git("rev-parse", "HEAD") or "unknown", tuple(line[3:] for line in status.splitlines())
    )


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ---- operator profiles --------------------------------------------------------------


@dataclass(frozen=True)
class OpCost:
    """One operator (with its input shapes) in a profile, per profiled iteration."""

    name: str
    shapes: str
    calls: float
    ms: float
    share: float  # of the iteration's wall time


@dataclass(frozen=True)
class OpProfile:
    label: str
    iterations: int
    wall_ms: float  # per iteration
    ops_ms: float  # self time of all operators, per iteration
    top: tuple[OpCost, ...]
    other_cores: float  # CPUs other processes kept busy meanwhile (see `other_cores`)

    @property
    def outside_ops_ms(self) -> float:
        """Wall time not inside any torch operator: Python, scheduling, bookkeeping."""
        return max(0.0, self.wall_ms - self.ops_ms)

    def table(self) -> str:
        lines = [
            f"{self.label}: {self.wall_ms:.2f} ms/iteration wall, {self.ops_ms:.2f} ms in "
            f"torch ops, {self.outside_ops_ms:.2f} ms outside them ({self.iterations} "
            f"iterations profiled; other processes: {self.other_cores:.2f} CPUs)",
            f"  {'ms':>8} {'share':>6} {'calls':>6}  operator [input shapes]",
        ]
        for op in self.top:
            lines.append(
                f"  {op.ms:>8.2f} {op.share:>6.1%} {op.calls:>6.0f}  {op.name} "
                f"{_clip(op.shapes, 90)}"
            )
        return "\n".join(lines)


def profile_ops(
    label: str, fn: Callable[[], object], iterations: int = 1, top: int = 10
) -> OpProfile:
    """Profile `iterations` calls of `fn` on the CPU; the top operators by self time.

    Operators are keyed by name and input shapes, so each projection of a layer shows
    as its own row. Times are each operator's own (self) wall time on the calling
    thread, divided by `iterations`.
    """
    load = cpu_snapshot()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        began = time.perf_counter()
        for _ in range(iterations):
            fn()
        wall = (time.perf_counter() - began) / iterations
    events = prof.key_averages(group_by_input_shape=True)
    total_self_us = sum(e.self_cpu_time_total for e in events)
    ranked = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
    costs = tuple(
        OpCost(
            name=e.key,
            shapes=str(e.input_shapes),
            calls=e.count / iterations,
            ms=e.self_cpu_time_total / 1e3 / iterations,
            share=e.self_cpu_time_total / 1e6 / iterations / wall,
        )
        for e in ranked
    )
    ops_ms = total_self_us / 1e3 / iterations
    return OpProfile(label, iterations, wall * 1e3, ops_ms, costs, other_cores(load))


def _clip(text: str, width: int) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


@dataclass(frozen=True)
class Target:
    """A goal on the ratio of our number to a reference number (higher is better)."""

    name: str
    definition: str
    ours: float
    reference: float
    goal: float  # minimum ratio ours / reference

    @property
    def ratio(self) -> float:
        return self.ours / self.reference

    @property
    def passed(self) -> bool:
        return self.ratio >= self.goal

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "definition": self.definition,
            "ours": self.ours,
            "reference": self.reference,
            "ratio": self.ratio,
            "goal": self.goal,
            "passed": self.passed,
        }


# ---- output -------------------------------------------------------------------------


def to_json(value: Any) -> Any:
    """Dataclasses, Timings and tuples as plain JSON values."""
    if hasattr(value, "as_json"):
        return to_json(value.as_json())
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: to_json(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, dict):
        return {str(k): to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    return value


def write_json(path: Path, payload: Any) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(to_json(payload), indent=2) + "\n")
    return path
