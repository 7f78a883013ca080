"""Tracing's cost: the throughput and CPU time of one cluster with traced and untraced
requests, in interleaved rounds of the same run.

    python -m benchmarks.tracing [--tiny] [--rounds 8] [--requests 12] [--concurrency 4]
                                 [--prompt 96] [--max-tokens 8]

One cluster as `pdserve up` starts it on local Ray (embedded Redis, 1 prefill + 1
decode replica), tracing on with the in-memory store (the cluster's Redis). Rounds
alternate: in a traced round each request carries a sampled W3C `traceparent`
(flags 01), in an untraced round an unsampled one (flags 00). The router's sampler
follows the client's flag and every other process follows the router, so an untraced
request records and exports no span anywhere: it takes the code path of a cluster with
tracing off plus the creation of non-recording spans (a few microseconds a request).
Consecutive rounds form a pair, and the pairs alternate which kind goes first, so a
drift in the host's load weighs on both kinds alike.

Each round sends `requests` prompts of `prompt` random token ids (fresh ones per
request, so no prefix-cache hit; above the disaggregation threshold, so each request
takes the disaggregated path with its per-layer spans) at `concurrency`, over gRPC.
Two figures per round: throughput, generated tokens per second of the round's wall
time; and the CPU time the cluster's processes (this run's Serve replicas and its
embedded Redis, read from /proc) spent per generated token. On a busy host the wall
time swings with the other processes' load, while the CPU time the cluster spends is
what its throughput is bound by once the host is saturated. Reported for both: each
pair's ratio traced / untraced, their median, and the cost; the target is under 2%.
Afterwards it checks that the store holds the spans of a traced request and none of an
untraced one, and prints the last traced request's waterfall (`pdserve trace`). JSON
goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse

import grpc

from benchmarks.common import host_info, write_json
from benchmarks.router_overhead import tiny_model
from cluster.client import Sampling
from cluster.client.messages import build_request
from cluster.client.sync import APPLICATION, call_metadata
from cluster.config import ClusterConfig
from cluster.config_file import load_config
from cluster.launcher import Launcher
from cluster.trace_cli import show
from engine.config import ModelConfig
from engine.model_source import resolve_model
from protos.pdserve.v1 import pdserve_pb2_grpc
from registry import connect
from registry.traces import TraceStore

logger = logging.getLogger(__name__)
RESULTS = Path(__file__).resolve().parent / "results"
THRESHOLD = 32


@dataclass(frozen=True)
class Round:
    traced: bool
    requests: int
    tokens: int
    wall_s: float
    cpu_s: float  # the cluster's processes, user + system

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s

    @property
    def cpu_ms_per_token(self) -> float:
        return 1000 * self.cpu_s / self.tokens


def _children() -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            out.setdefault(ppid, []).append(int(entry))
    return out


def cluster_pids(redis_port: int | None) -> list[int]:
    """This run's Serve replicas (descendants of this process) and its Redis server."""
    children, pids, stack = _children(), [], [os.getpid()]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
        except OSError:
            continue
        if "ServeReplica" in cmd:
            pids.append(pid)
    if redis_port is not None:
        for pid in (int(e) for e in os.listdir("/proc") if e.isdigit()):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if Path(cmd.split(" ")[0]).name == "redis-server" and f":{redis_port}" in cmd:
                pids.append(pid)
    return pids


def cpu_s(pids: list[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / os.sysconf("SC_CLK_TCK")


def config(model_dir: str) -> ClusterConfig:
    return load_config(
        None,
        [
            "name=bench-tracing",
            f"model.source={model_dir}",
            "model.max_model_len=512",
            "pools.prefill.engine.kv_cache_bytes=64MiB",
            "pools.decode.engine.kv_cache_bytes=64MiB",
            f"router.disaggregation_threshold={THRESHOLD}",
            "tracing.enabled=true",
            "tracing.max_requests=4096",
        ],
    )


def traceparent(sampled: bool) -> tuple[str, str]:
    tid, sid = secrets.token_hex(16), secrets.token_hex(8)
    return tid, f"00-{tid}-{sid}-{'01' if sampled else '00'}"


async def _one(
    stub: pdserve_pb2_grpc.PDServeStub, ids: list[int], max_tokens: int, traced: bool
) -> tuple[int, str]:
    """Generated tokens of one request, and its trace id."""
    sampling = Sampling(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    req = build_request(token_ids=ids, sampling=sampling)
    tid, tp = traceparent(traced)
    md = (*call_metadata(None, APPLICATION), ("traceparent", tp))
    n = 0
    async for msg in stub.Generate(req, metadata=md, timeout=300):
        n += len(msg.token_ids)
    return n, tid


async def run_round(
    target: str,
    prompts: list[list[int]],
    max_tokens: int,
    concurrency: int,
    traced: bool,
    pids: list[int],
) -> tuple[Round, list[str]]:
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)

        async def bounded(ids: list[int]) -> tuple[int, str]:
            async with sem:
                return await _one(stub, ids, max_tokens, traced)

        start, cpu0 = time.perf_counter(), cpu_s(pids)
        out = await asyncio.gather(*(bounded(p) for p in prompts))
        wall, cpu = time.perf_counter() - start, cpu_s(pids) - cpu0
    tokens = sum(n for n, _ in out)
    return Round(traced, len(prompts), tokens, wall, cpu), [t for _, t in out]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.tracing", description=__doc__)
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="a random 4-layer model instead")
    parser.add_argument("--rounds", type=int, default=8, help="rounds of each kind")
    parser.add_argument("--requests", type=int, default=12, help="requests per round")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=96, help="prompt tokens")
    parser.add_argument("--max-tokens", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.prompt <= THRESHOLD:
        parser.error(f"--prompt must exceed the disaggregation threshold ({THRESHOLD})")
    rng = random.Random(0)
    rounds: list[Round] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        model_dir = str(tiny_model(Path(tmp)) if args.tiny else resolve_model(args.model))
        vocab = ModelConfig.from_dir(model_dir).vocab_size

        def batch() -> list[list[int]]:
            n = args.requests
            return [[rng.randrange(100, vocab) for _ in range(args.prompt)] for _ in range(n)]

        launcher = Launcher(config(model_dir), echo=lambda m: print(f"  {m}", flush=True))
        state = launcher.start()
        try:
            target = launcher.grpc_target
            pids = cluster_pids(urlparse(state.redis_url).port)
            print(f"  measuring the CPU time of {len(pids)} processes", flush=True)
            warm = run_round(target, batch(), args.max_tokens, args.concurrency, False, pids)
            asyncio.run(warm)
            traced_ids: list[str] = []
            untraced_ids: list[str] = []
            for i in range(args.rounds):
                order = (True, False) if i % 2 == 0 else (False, True)
                for traced in order:
                    r, ids = asyncio.run(
                        run_round(target, batch(), args.max_tokens, args.concurrency, traced, pids)
                    )
                    rounds.append(r)
                    (traced_ids if traced else untraced_ids).extend(ids)
                    print(
                        f"  round {len(rounds):>2} {'traced  ' if traced else 'untraced'} "
                        f"{r.tokens_per_s:8.1f} tok/s ({r.wall_s:.2f} s), "
                        f"{r.cpu_ms_per_token:7.1f} CPU ms/token",
                        flush=True,
                    )
            time.sleep(2.0)  # the exporters' last batches
            stored = check_store(state.redis_url, traced_ids[-1], untraced_ids[-1])
            print(show(state.redis_url, "bench-tracing", traced_ids[-1], width=48))
        finally:
            launcher.stop()
    report(args, rounds, stored, model_dir)
    return 0


def check_store(redis_url: str, traced: str, untraced: str) -> dict[str, int]:
    client = connect(redis_url)
    try:
        store = TraceStore(client, "bench-tracing")
        spans = {"traced": len(store.spans(traced)), "untraced": len(store.spans(untraced))}
    finally:
        client.close()
    if spans["traced"] == 0 or spans["untraced"] != 0:
        raise SystemExit(f"the trace store does not match the rounds' sampling: {spans}")
    return spans


def _pair_ratios(rounds: list[Round], value: Callable[[Round], float]) -> list[float]:
    """traced / untraced of each pair of consecutive rounds."""
    out = []
    for i in range(0, len(rounds) - 1, 2):
        a, b = rounds[i], rounds[i + 1]
        on, off = (a, b) if a.traced else (b, a)
        out.append(value(on) / value(off))
    return out


def report(
    args: argparse.Namespace, rounds: list[Round], stored: dict[str, int], model: str
) -> None:
    tput = _pair_ratios(rounds, lambda r: r.tokens_per_s)
    cpu = _pair_ratios(rounds, lambda r: r.cpu_ms_per_token)
    host = host_info(("opentelemetry-sdk", "ray"))
    print(
        f"\ntracing cost, {len(tput)} pairs of rounds ({args.requests} requests each, "
        f"concurrency {args.concurrency}, {args.prompt}-token prompts, {args.max_tokens} "
        f"tokens out), load average {host.loadavg[0]:.1f} on {host.cpu_count} CPUs:"
    )
    for traced in (True, False):
        rs = [r for r in rounds if r.traced is traced]
        print(
            f"  {'traced  ' if traced else 'untraced'} median "
            f"{statistics.median(r.tokens_per_s for r in rs):8.1f} tok/s, "
            f"{statistics.median(r.cpu_ms_per_token for r in rs):7.1f} CPU ms/token"
        )
    print(f"  throughput, traced/untraced per pair: {' '.join(f'{x:.3f}' for x in tput)}")
    print(
        f"    median {statistics.median(tput):.3f}: "
        f"cost {100 * (1 - statistics.median(tput)):+.1f}% (target < 2%)"
    )
    print(f"  CPU per token, traced/untraced per pair: {' '.join(f'{x:.3f}' for x in cpu)}")
    print(
        f"    median {statistics.median(cpu):.3f}: "
        f"cost {100 * (statistics.median(cpu) - 1):+.1f}% (target < 2%)"
    )
    print(f"  spans stored for the last traced request: {stored['traced']}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = write_json(
        RESULTS / f"tracing-{stamp}.json",
        {
            "args": vars(args),
            "model": model,
            "rounds": [
                {"traced": r.traced, "tokens": r.tokens, "wall_s": r.wall_s, "cpu_s": r.cpu_s}
                for r in rounds
            ],
            "throughput_pair_ratios": tput,
            "cpu_per_token_pair_ratios": cpu,
            "stored_spans": stored,
            "host": host,
        },
    )
    print(f"  wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
