"""The dashboard benchmark's load: mixed short and long prompts, streamed over gRPC and
HTTP at once, open loop and bounded in time.

`plan(...)` draws the requests: short prompts (below the router's disaggregation
threshold: the decode instance prefills them itself) and long ones (prefilled by the
prefill pool, their KV sent to the decode instance), half of the long ones after a
shared 256-token prefix so that the prefix cache has something to hit; each request
goes over gRPC or HTTP at random; arrivals are Poisson at `rate`
(`benchmarks.workload`). `drive(...)` sends them: the gRPC ones through the serving
benchmark's `run_rate`, the HTTP ones as streamed `/v1/completions` (`SseStream`),
each scheduled at its offset from a common start, and it ends, at the latest,
`deadline_s` after the last arrival.
"""

from __future__ import annotations

import asyncio
import random
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from benchmarks.fault_load import SseStream, StreamResult
from benchmarks.serving_driver import run_rate
from benchmarks.slo import StreamRecord
from benchmarks.workload import Mix, Request, arrival_offsets, random_prompt
from cluster.client import AsyncClient

SHORT = Mix.parse("uniform:16:48", "uniform:8:24")
LONG = Mix.parse("lognormal:448:0.3:192:800", "uniform:16:48")
LONG_TAIL = Mix.parse("lognormal:192:0.4:96:480", "uniform:16:48")  # after the shared prefix
PREFIX_TOKENS = 256


@dataclass(frozen=True)
class Planned:
    request: Request
    protocol: str  # grpc | http
    kind: str  # short | long | prefixed


def plan(
    n: int, rate: float, vocab: int, max_model_len: int, seed: int
) -> tuple[list[Planned], list[float]]:
    rng = random.Random(seed)
    prefix = random_prompt(PREFIX_TOKENS, vocab, rng)
    out = []
    for _ in range(n):
        kind = rng.choice(("short", "short", "long", "prefixed"))
        if kind == "prefixed":
            tail = LONG_TAIL.request(rng, vocab, max_model_len - PREFIX_TOKENS)
            req = Request(prefix + tail.prompt, tail.output_len)
        else:
            req = (SHORT if kind == "short" else LONG).request(rng, vocab, max_model_len)
        out.append(Planned(req, rng.choice(("grpc", "http")), kind))
    return out, arrival_offsets(n, rate, 1.0, rng)


@dataclass
class LoadResult:
    grpc: list[tuple[Planned, StreamRecord]]
    http: list[tuple[Planned, StreamResult]]

    def summary(self) -> list[str]:
        counts: Counter[tuple[str, str, str]] = Counter()
        for p, rec in self.grpc:
            counts[("grpc", p.kind, "ok" if rec.ok else "failed")] += 1
        for p, res in self.http:
            ok = res.ended_properly and not res.errors and bool(res.tokens)
            counts[("http", p.kind, "ok" if ok else "failed")] += 1
        paths: Counter[str] = Counter()
        for _, rec in self.grpc:
            if rec.server:
                paths["disaggregated" if rec.server["disaggregated"] else "colocated"] += 1
        lines = [
            f"  {proto:<5} {kind:<9} {outcome:<7} {n}"
            for (proto, kind, outcome), n in sorted(counts.items())
        ]
        lines.append(f"  gRPC requests by path (server timings): {dict(paths)}")
        return lines

    def failures(self) -> list[str]:
        out = [f"grpc: {rec.error}" for _, rec in self.grpc if not rec.ok]
        out += [
            f"http: {res.failure or res.errors or 'no tokens'}"
            for _, res in self.http
            if not (res.ended_properly and not res.errors and res.tokens)
        ]
        return out


async def _http(
    port: int,
    planned: Sequence[Planned],
    offsets: Sequence[float],
    timeout_s: float,
    deadline_s: float,
) -> list[StreamResult]:
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(p: Planned, offset: float) -> StreamResult:
        await asyncio.sleep(max(0.0, start + offset - loop.time()))
        body = {
            "prompt": list(p.request.prompt),
            "max_tokens": p.request.output_len,
            "ignore_eos": True,
        }
        stream = SseStream(port, body, read_timeout_s=timeout_s).start()
        return await asyncio.to_thread(stream.join, timeout_s)

    return list(
        await asyncio.wait_for(
            asyncio.gather(*(one(p, o) for p, o in zip(planned, offsets, strict=True))),
            max(offsets, default=0.0) + deadline_s,
        )
    )


async def drive(
    client: AsyncClient,
    http_port: int,
    planned: Sequence[Planned],
    offsets: Sequence[float],
    *,
    request_timeout_s: float,
    deadline_s: float,
) -> LoadResult:
    grpc = [(p, o) for p, o in zip(planned, offsets, strict=True) if p.protocol == "grpc"]
    http = [(p, o) for p, o in zip(planned, offsets, strict=True) if p.protocol == "http"]
    records, results = await asyncio.gather(
        run_rate(
            client,
            [p.request for p, _ in grpc],
            [o for _, o in grpc],
            request_timeout_s=request_timeout_s,
            deadline_s=deadline_s,
        ),
        _http(http_port, [p for p, _ in http], [o for _, o in http], request_timeout_s, deadline_s),
    )
    return LoadResult(
        list(zip([p for p, _ in grpc], records, strict=True)),
        list(zip([p for p, _ in http], results, strict=True)),
    )
