"""Fault tolerance under a steady streamed load: what each fault costs the clients.

    python -m benchmarks.faults [--requests 24] [--concurrency 6] [--max-tokens 200]
                                [--faults decode,prefill,rank,redis,router]

Two clusters on local Ray (`pdserve up`'s launcher: embedded Redis, Serve's proxies),
one after the other, with the tiny random Llama of the tests (SmolLM2's tokenizer), so
that the figures are about the serving path, not the model:

* A: one router replica, two decode replicas and one prefill replica of two pipeline
  ranks; in turn a decode replica SIGKILLed (the one holding the most streams), the
  prefill replica (rank 0, a Serve replica) SIGKILLed while KV transfers are in flight,
  the prefill replica's rank-1 actor SIGKILLed while transfers are in flight, and the
  embedded redis-server paused with SIGSTOP for `--pause-s` (30 s) then resumed. Before
  each fault the cluster is back to full strength (Serve replaced what was killed);
* B: two router replicas, one prefill and one decode replica; one router replica
  SIGKILLed.

Load: at least `--requests` streamed requests per fault, `--concurrency` at a time
(more while the fault lasts: the load goes on until the fault's injection, and the wait
for its exclusion, are over), alternately
over HTTP (SSE /v1/completions) and gRPC (the client library, which retries UNAVAILABLE
before the first token), two in three with a fresh long prompt (prefilled by the prefill
pool, KV transferred) and one in three short (prefilled by the decode replica), greedy,
exactly `--max-tokens` tokens each. Each KV message is delayed 50 ms (kv_transfer's
fault injection) so that transfers last long enough to be cut. The fault is injected
once `--concurrency` streams are running (and, for the prefill faults, a transfer is in
flight).

Per fault: requests sent; identical (ended properly with exactly the single engine's
greedy tokens); migrated (the final message's `migrations` timing, where the server
reports it); retried (the routers' `pdserve_request_retries` plus the gRPC client's
own retries); resumed (gRPC streams the client library continued after a break);
failed (ended with an error event or status, or refused); truncated (a cut stream, or
one with no byte for 30 s); the longest wait for a byte after the fault; and the time
from the fault to the router's exclusion of the instance (`pdserve_instance_exclusions`,
polled every 50 ms; "-" where no instance is excluded).
On cluster B the metrics come from whichever router the proxy picks, so the router
retries there are a lower bound.

Output: the table, and JSON in benchmarks/results/faults-<stamp>.json.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import logging
import secrets
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.fault_kinds import FAULTS, FULL
from benchmarks.fault_load import GrpcStream, HealthWatch, SseStream, StreamResult, rank_actor_pids
from cluster.client import Client, Sampling
from cluster.config import ClusterConfig
from cluster.config_file import load_config
from cluster.launcher import Launcher
from cluster.redis_state import read_state
from engine import LLM, SamplingParams
from registry import Registry, connect

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
READ_TIMEOUT_S = 30.0
MAX_MODEL_LEN = 1024
THRESHOLD = 16
BASE_TEXT = [
    "In the beginning the universe was created. This has made a lot of people very angry "
    "and been widely regarded as a bad move by almost everyone who has thought about it.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was "
    "the age of foolishness, it was the epoch of belief, it was the epoch of incredulity.",
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no "
    "money in my purse, and nothing particular to interest me on shore, I thought I would sail.",
]
SHORT = ["Hi there", "2 + 2 =", "The sky is", "Once upon a"]


@dataclass
class FaultResult:
    fault: str
    sent: int = 0
    identical: int = 0
    migrated: int = 0
    retried: int = 0
    resumed: int = 0  # streams the gRPC client continued after a break (`resume`)
    failed: int = 0
    truncated: int = 0
    longest_stall_s: float = 0.0
    exclusion_s: float | None = None
    health_missed: int = 0
    health_checks: int = 0
    notes: list[str] = field(default_factory=list)


class Bench:
    """One running cluster and what the faults need of it."""

    def __init__(self, launcher: Launcher, args: argparse.Namespace, llm: LLM) -> None:
        self.launcher, self.args, self.llm = launcher, args, llm
        self.http_port = launcher.config.server.http_port
        redis = read_state(launcher.run_dir)
        assert redis is not None, "the benchmark runs an embedded Redis"
        self.redis_pid = redis.pid
        self.registry = Registry(connect(redis.url), launcher.config.name)
        self.sampling = Sampling(temperature=0, max_tokens=args.max_tokens, ignore_eos=True)
        secret = launcher.config.server.grpc_bearer_token
        self.token = secret.get_secret_value() if secret is not None else None
        self._refs: dict[str, list[int]] = {}
        self._fresh = 0

    def prompt_stream(self) -> Iterator[str]:
        """Two fresh long prompts, then a short one, and so on; their greedy references
        are computed in batches ahead of the load."""
        i = 0
        while True:
            batch = []
            for _ in range(4 * self.args.requests):
                i += 1
                if i % 3 == 0:
                    batch.append(SHORT[i % len(SHORT)])
                else:
                    self._fresh += 1
                    batch.append(f"Request {self._fresh}. {BASE_TEXT[self._fresh % 3]}")
            self.reference_all(batch)
            yield from batch

    def reference_all(self, prompts: list[str]) -> None:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._refs]
        params = SamplingParams(temperature=0, max_tokens=self.args.max_tokens, ignore_eos=True)
        for p, o in zip(todo, self.llm.generate(todo, params), strict=True):
            self._refs[p] = o.token_ids

    def metric(self, name: str) -> float:
        url = f"{self.launcher.http_url}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            lines = resp.read().decode().splitlines()
        return sum(float(x.rsplit(" ", 1)[1]) for x in lines if x.startswith(name))

    def instances(self) -> list[tuple[str, str, str]]:
        return [(i.pool, i.instance_id, i.address) for i in self.registry.live_instances()]

    def state(self, pool: str, address: str) -> Any:
        from ray import serve

        from cluster.builder import APP_NAME
        from router.pinning import PIN_KWARG

        handle = serve.get_deployment_handle(pool, app_name=APP_NAME)
        return handle.state.remote(**{PIN_KWARG: address}).result(timeout_s=10)

    def wait_full(self, pools: dict[str, int], ranks: int, timeout_s: float = 300.0) -> None:
        """Until the registry lists `pools` replicas, every one answers, `ranks` rank
        actors live, and the cluster says it is healthy."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                inst = self.instances()
                counts = {p: sum(1 for q, _, _ in inst if q == p) for p in pools}
                if counts == pools and len(rank_actor_pids()) == ranks:
                    for pool, _, address in inst:
                        self.state(pool, address)
                    with Client(self.launcher.grpc_target, token=self.token) as c:
                        if c.healthy(timeout_s=2.0):
                            return
            time.sleep(1.0)
        raise RuntimeError(f"the cluster did not get back to {pools} within {timeout_s}s")

    def start(self, prompt: str, i: int) -> SseStream | GrpcStream:
        if i % 2:
            target = self.launcher.grpc_target
            return GrpcStream(target, prompt, self.sampling, 4 * READ_TIMEOUT_S, self.token).start()
        body = {
            "prompt": prompt,
            "max_tokens": self.args.max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        return SseStream(self.http_port, body, READ_TIMEOUT_S).start()

    def reference(self, prompt: str) -> list[int]:
        return self._refs[prompt]


def _load(bench: Bench, prompts: Iterator[str], inject: Callable[[], None]) -> Iterator[Any]:
    """Keeps `--concurrency` requests running; once that many have their first token,
    starts `inject()` on its own thread (the load goes on meanwhile), and stops sending
    once `--requests` were sent and `inject()` returned. Yields (prompt, result) pairs
    as they end."""
    conc = bench.args.concurrency
    running: dict[int, tuple[str, SseStream | GrpcStream]] = {}
    fault: threading.Thread | None = None
    sent = 0
    deadline = time.monotonic() + 900.0
    while time.monotonic() < deadline:
        more = sent < bench.args.requests or fault is None or fault.is_alive()
        if not more and not running:
            break
        while more and len(running) < conc:
            p = next(prompts)
            running[sent] = (p, bench.start(p, sent))
            sent += 1
        if fault is None and all(s.result.reads for _, s in running.values()):
            fault = threading.Thread(target=inject, name="fault", daemon=True)
            fault.start()
        for i, (p, s) in list(running.items()):
            if not s._thread.is_alive():
                del running[i]
                yield p, s.join(0.1)
        time.sleep(0.02)
    for p, s in running.values():
        yield p, s.join(1.0)
    if fault is not None:
        fault.join(5.0)


def run_fault(
    bench: Bench, name: str, kill: Callable[[], str | None], excludes: bool
) -> FaultResult:
    """`kill()` injects the fault (it may block, e.g. for a pause) and returns a note."""
    res = FaultResult(name)
    retries0 = bench.metric("pdserve_request_retries_total")
    excl0 = bench.metric("pdserve_instance_exclusions_total")
    fault_at: list[float] = []

    def inject() -> None:
        fault_at.append(time.monotonic())
        note = kill()
        if note:
            res.notes.append(note)
        if excludes:
            while time.monotonic() - fault_at[0] < 60.0:
                with contextlib.suppress(Exception):
                    if bench.metric("pdserve_instance_exclusions_total") > excl0:
                        res.exclusion_s = time.monotonic() - fault_at[0]
                        return
                time.sleep(0.05)

    results: list[tuple[str, StreamResult]] = []
    with HealthWatch(bench.launcher.grpc_target, bench.http_port, token=bench.token) as watch:
        prompts = bench.prompt_stream()
        first = next(prompts)  # computes the first batch's references before the clock
        for pair in _load(bench, itertools.chain([first], prompts), inject):
            results.append(pair)
    res.health_checks, res.health_missed = watch.checks, len(watch.missed)
    at = fault_at[0] if fault_at else time.monotonic()
    res.sent = len(results)
    for prompt, r in results:
        res.migrated += int(r.timings.get("migrations") or 0)
        res.retried += r.retries
        res.resumed += r.resumes
        res.longest_stall_s = max(res.longest_stall_s, r.longest_gap_after(at))
        if r.failure.startswith(("cut", "stall")) or (not r.done and not r.failure):
            res.truncated += 1
        elif r.failure or r.errors:
            res.failed += 1
        elif r.tokens == bench.reference(prompt):
            res.identical += 1
        else:
            res.notes.append(f"{prompt[:24]!r}: {len(r.tokens)} tokens, not the greedy text")
    with contextlib.suppress(Exception):
        res.retried += int(bench.metric("pdserve_request_retries_total") - retries0)
    return res


def cluster_config(which: str, model_dir: str) -> ClusterConfig:
    from benchmarks.serving import free_port

    common = [
        f"name=bench-faults-{which.lower()}",
        f"model.source={model_dir}",
        f"model.max_model_len={MAX_MODEL_LEN}",
        f"server.grpc_port={free_port()}",
        f"server.http_port={free_port()}",
        "redis.lease_ttl_s=3",
        "redis.load_report_interval_s=0.2",
        "router.view_refresh_interval_s=0.1",
        f"router.disaggregation_threshold={THRESHOLD}",
        "kv_transfer.timeout_s=10",
        "kv_transfer.faults=[{kind: delay, times: 0, delay_s: 0.05}]",
        "pools.prefill.engine.kv_cache_bytes=8MiB",
        "pools.decode.engine.kv_cache_bytes=16MiB",
        "ray.num_cpus=4",
        # Serve's gRPC proxy listens on every interface: keep strangers out
        f"server.grpc_bearer_token={secrets.token_urlsafe(24)}",
    ]
    if which == "A":
        layout = [
            "pools.decode.replicas=2",
            "pools.prefill.pp=2",
            "pools.prefill.resources_per_rank={CPU: 0.5}",
            "pools.prefill.rank_timeout_s=30",
        ]
    else:
        layout = ["router.replicas=2", "router.num_cpus=0.5"]
    return load_config(None, [*common, *layout])


def run_cluster(
    which: str, names: list[str], args: argparse.Namespace, model_dir: str, llm: LLM
) -> list[FaultResult]:
    launcher = Launcher(
        cluster_config(which, model_dir), echo=lambda m: print(f"  [{which}] {m}", flush=True)
    )
    out: list[FaultResult] = []
    launcher.start(timeout_s=600.0)
    try:
        bench = Bench(launcher, args, llm)
        pools, ranks = FULL[which]
        for key in names:
            title, kill, excludes, _ = FAULTS[key]
            bench.wait_full(pools, ranks)
            print(f"  {title} ...", flush=True)
            out.append(run_fault(bench, title, lambda k=kill: k(bench), excludes))  # type: ignore[misc]
            print("  " + _row(out[-1]), flush=True)
    finally:
        launcher.stop()
    return out


HEADER = (
    f"{'fault':<34} {'sent':>5} {'identical':>9} {'migrated':>8} {'retried':>7} {'resumed':>7} "
    f"{'failed':>6} "
    f"{'truncated':>9} {'longest stall':>13} {'to exclusion':>12}"
)


def _row(r: FaultResult) -> str:
    excl = f"{r.exclusion_s:.2f} s" if r.exclusion_s is not None else "-"
    return (
        f"{r.fault:<34} {r.sent:>5} {r.identical:>9} {r.migrated:>8} {r.retried:>7} {r.resumed:>7} "
        f"{r.failed:>6} {r.truncated:>9} {r.longest_stall_s:>11.1f} s {excl:>12}"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--requests", type=int, default=24, help="requests per fault")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--pause-s", type=float, default=30.0, help="how long Redis is paused")
    ap.add_argument("--faults", default=",".join(FAULTS), help=f"of {','.join(FAULTS)}")
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    args.faults = [f for f in args.faults.split(",") if f]
    unknown = [f for f in args.faults if f not in FAULTS]
    if unknown:
        ap.error(f"--faults: unknown {unknown}; known: {list(FAULTS)}")
    if args.requests < args.concurrency or args.concurrency < 1:
        ap.error("--requests must be at least --concurrency, which must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    from benchmarks.common import host_info, write_json
    from benchmarks.router_overhead import tiny_model

    began = time.monotonic()
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    results: list[FaultResult] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-faults-") as tmp:
        model_dir = str(tiny_model(Path(tmp)))
        llm = LLM(model_dir, num_threads=1, kv_cache_bytes=16 << 20, max_model_len=MAX_MODEL_LEN)
        for which in ("A", "B"):
            names = [f for f in args.faults if FAULTS[f][3] == which]
            if names:
                results += run_cluster(which, names, args, model_dir, llm)
    print(f"\n{HEADER}")
    for r in results:
        print(_row(r))
    for r in results:
        for note in r.notes:
            print(f"  {r.fault}: {note}")
        if r.health_missed:
            print(f"  {r.fault}: {r.health_missed} of {r.health_checks} health checks over 1 s")
    path = write_json(
        args.out / f"faults-{stamp}.json",
        {"host": host_info(), "args": {k: str(v) for k, v in vars(args).items()},
         "results": [asdict(r) for r in results]},
    )  # fmt: skip
    print(f"\nwrote {path} ({(time.monotonic() - began) / 60:.1f} min)")
    ok = all(r.identical + r.failed + r.truncated == r.sent for r in results)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
