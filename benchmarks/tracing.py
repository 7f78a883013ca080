"""Tracing's cost: the throughput of one cluster with traced and untraced requests,
in interleaved rounds of the same run.

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
Throughput is generated tokens per second of the round's wall time. Reported: each
pair's ratio traced / untraced, their median, and the cost (1 - median ratio); the
target is under 2%. Afterwards it checks that the store holds the spans of a traced
request and none of an untraced one, and prints the last traced request's waterfall
(`pdserve trace`). JSON goes to benchmarks/results/.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import random
import secrets
import statistics
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

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

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s


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
    target: str, prompts: list[list[int]], max_tokens: int, concurrency: int, traced: bool
) -> tuple[Round, list[str]]:
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = pdserve_pb2_grpc.PDServeStub(channel)

        async def bounded(ids: list[int]) -> tuple[int, str]:
            async with sem:
                return await _one(stub, ids, max_tokens, traced)

        start = time.perf_counter()
        out = await asyncio.gather(*(bounded(p) for p in prompts))
        wall = time.perf_counter() - start
    return Round(traced, len(prompts), sum(n for n, _ in out), wall), [t for _, t in out]


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
            asyncio.run(run_round(target, batch(), args.max_tokens, args.concurrency, False))
            traced_ids: list[str] = []
            untraced_ids: list[str] = []
            for i in range(args.rounds):
                order = (True, False) if i % 2 == 0 else (False, True)
                for traced in order:
                    r, ids = asyncio.run(
                        run_round(target, batch(), args.max_tokens, args.concurrency, traced)
                    )
                    rounds.append(r)
                    (traced_ids if traced else untraced_ids).extend(ids)
                    print(
                        f"  round {len(rounds):>2} {'traced  ' if traced else 'untraced'} "
                        f"{r.tokens_per_s:8.1f} tok/s ({r.wall_s:.2f} s)",
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


def report(
    args: argparse.Namespace, rounds: list[Round], stored: dict[str, int], model: str
) -> None:
    pairs = [(rounds[i], rounds[i + 1]) for i in range(0, len(rounds), 2)]
    ratios = []
    for a, b in pairs:
        on, off = (a, b) if a.traced else (b, a)
        ratios.append(on.tokens_per_s / off.tokens_per_s)
    median = statistics.median(ratios)
    on_all = [r.tokens_per_s for r in rounds if r.traced]
    off_all = [r.tokens_per_s for r in rounds if not r.traced]
    host = host_info(("opentelemetry-sdk", "ray"))
    print(
        f"\ntracing cost, {len(pairs)} pairs of rounds ({args.requests} requests each, "
        f"concurrency {args.concurrency}, {args.prompt}-token prompts, {args.max_tokens} "
        f"tokens out), load average {host.loadavg[0]:.1f}:"
    )
    print(f"  traced   median {statistics.median(on_all):8.1f} tok/s")
    print(f"  untraced median {statistics.median(off_all):8.1f} tok/s")
    print(f"  pair ratios traced/untraced: {' '.join(f'{r:.3f}' for r in ratios)}")
    print(f"  median ratio {median:.3f}: cost {100 * (1 - median):+.1f}% (target < 2%)")
    print(f"  spans stored for the last traced request: {stored['traced']}")
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S")
    path = write_json(
        RESULTS / f"tracing-{stamp}.json",
        {
            "args": vars(args),
            "model": model,
            "rounds": [
                {"traced": r.traced, "tokens": r.tokens, "wall_s": r.wall_s} for r in rounds
            ],
            "pair_ratios": ratios,
            "median_ratio": median,
            "stored_spans": stored,
            "host": host,
        },
    )
    print(f"  wrote {path}")


if __name__ == "__main__":
    raise SystemExit(main())
