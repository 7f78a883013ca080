"""Goodput under latency SLOs: the disaggregated cluster against the colocated
baseline, on the same CPU, in one invocation.

    python -m benchmarks.serving                      # the full sweep (about 25 min)
    python -m benchmarks.serving --quick              # 2 rates x 8 requests (about 6 min)
    python -m benchmarks.serving --tiny --quick       # a random tiny model: smoke run
        [--mix prompt-heavy|sharegpt|short] [--prompt-len SPEC] [--output-len SPEC]
        [--rates 0.2,0.3,0.4,0.5,0.6] [--requests 24] [--burstiness 1.0]
        [--ttft-slo-ms 6000] [--tpot-slo-ms 200] [--attainment 0.9]
        [--modes disaggregated,colocated] [--chunk-tokens 512]

Modes, one cluster after the other (`pdserve up`'s launcher: local Ray, embedded Redis):

* disaggregated: 1 prefill + 1 decode replica, KV over torch_dist (Gloo on loopback);
  prompts of at least `router.disaggregation_threshold` (64) uncached tokens, which
  is every prompt of the prompt-heavy mix, are prefilled by the prefill replica;
* colocated: 2 colocated replicas, each prefilling and decoding, with chunked prefill
  (`max_num_batched_tokens = --chunk-tokens` per step, running decodes first); the
  router sends each request to the replica with fewer active sequences.

Same CPU: each engine replica asks Ray for 1 CPU and pins torch to 1 thread, so both
modes run 2 engine threads; the router asks for 1 more logical CPU. Local Ray gets 3
logical CPUs in both modes, on however many cores the host has (2 here), which the
router, Serve's proxies, Redis and this client share with the engines. KV cache: 512
MiB per replica in both modes. Model: SmolLM2-135M-Instruct, fp32.

Load: for each rate, `--requests` requests with lengths from the mix (see
`benchmarks.workload`; the same definitions as the locustfile), unique random-token
prompts, outputs of exactly the sampled length, sent open loop with Gamma
inter-arrival times (`--burstiness` 1 = Poisson). Both modes get the same requests at
the same offsets. Each mode first warms up with untimed requests; after each rate the
cluster drains to idle. A rate ends `--drain-s` after its last arrival at the latest;
what is unfinished then counts as failed. With 24 requests a rate, P99 is close to
the maximum: read it as "the worst requests". The default rates reach past the
prefill capacity of one engine (about 0.5 req/s for this mix) so that the sweep
finds where attainment falls.

Measurements (client side, per request; see `benchmarks.slo`): TTFT, TPOT, ITL and
E2E at P50/P90/P99. Goodput (DistServe): the highest swept rate at which at least 90%
of requests meet both SLOs, with a linear interpolation to the next rate. A second
table gives the server's medians (queue, prefill, KV transfer, TPOT as the decode
engine timed it), the sequences each decoding engine held on average, and the CPUs
this run and other processes used.

SLO defaults, from this host's unloaded latencies (SmolLM2 on the engine alone, one
torch thread): prefilling 512 tokens (the mix's median prompt) takes about 1.5 s and
860 (its p90) about 2.9 s; a decode step takes about 65 ms for one sequence, 110 ms
for 2 to 4 and 160 ms for 8. TTFT SLO 6 s: twice the p90 prompt's prefill. TPOT SLO
200 ms: three times a one-sequence decode step. `--slo-scales` recomputes goodput
with both SLOs scaled, from the same requests, to show how much the verdict depends
on that choice.

Output: the tables, the goodput ratio (disaggregated / colocated) and the P99 TPOT
ratio (colocated / disaggregated, per rate; the target asks for >= 1.5, i.e.
disaggregated P99 TPOT <= 1/1.5 of colocated), JSON
`benchmarks/results/serving-<stamp>.json` (rewritten after every rate, so an
interrupted run keeps what it measured) and the plots `serving-<stamp>-cdf.png` and
`serving-<stamp>-slo.png` next to it. On a shared host, look at the "other CPUs"
column and rerun when it is high.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import secrets
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import serving_plots
from benchmarks.serving_driver import CpuMeter, run_rate, wait_idle, warm_up
from benchmarks.serving_report import (
    HEADER,
    MODES,
    ModeRun,
    finite,
    print_report,
    rate_row,
    to_json,
)
from benchmarks.slo import RateSummary, Slo
from benchmarks.workload import MIXES, Mix, Request, arrival_offsets
from cluster.client import AsyncClient
from cluster.config import ClusterConfig
from cluster.config_file import load_config
from cluster.launcher import Launcher

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
KV_CACHE = "512MiB"
MAX_MODEL_LEN = 2048
DEFAULT_RATES = (0.2, 0.3, 0.4, 0.5, 0.6)
TTFT_SLO_MS = 6000.0
TPOT_SLO_MS = 200.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cluster_config(mode: str, model_dir: str, chunk_tokens: int, token: str) -> ClusterConfig:
    if mode == "colocated":
        pools = [
            "pools=[{name: main, role: colocated, replicas: 2, resources_per_rank: {CPU: 1}, "
            f"engine: {{kv_cache_bytes: {KV_CACHE}, max_num_batched_tokens: {chunk_tokens}}}}}]"
        ]
    else:
        pools = [
            f"pools.prefill.engine.kv_cache_bytes={KV_CACHE}",
            f"pools.decode.engine.kv_cache_bytes={KV_CACHE}",
        ]
    return load_config(
        None,
        [
            "name=bench-serving",
            f"model.source={model_dir}",
            f"model.max_model_len={MAX_MODEL_LEN}",
            f"server.grpc_port={free_port()}",
            f"server.http_port={free_port()}",
            "ray.num_cpus=3",
            # Serve's gRPC proxy listens on every interface: keep strangers out
            f"server.grpc_bearer_token={token}",
            *pools,
        ],
    )


@dataclass(frozen=True)
class Plan:
    """The requests and arrival offsets of every rate, shared by both modes."""

    rates: tuple[float, ...]
    requests: dict[float, list[Request]]
    offsets: dict[float, list[float]]
    warmup: list[Request]


def make_plan(args: argparse.Namespace, mix: Mix, vocab: int) -> Plan:
    requests, offsets = {}, {}
    for i, rate in enumerate(args.rates):
        requests[rate] = mix.requests(
            args.requests, random.Random(args.seed + i), vocab, MAX_MODEL_LEN
        )
        offsets[rate] = arrival_offsets(
            args.requests, rate, args.burstiness, random.Random(args.seed + 1000 + i)
        )
    warmup = mix.requests(3, random.Random(args.seed - 1), vocab, MAX_MODEL_LEN)
    return Plan(tuple(args.rates), requests, offsets, warmup)


async def run_mode(
    run: ModeRun, plan: Plan, args: argparse.Namespace, model_dir: str, slo: Slo, save: Any
) -> None:
    """Start `run.mode`'s cluster, sweep the rates into `run`, stop the cluster."""
    mode = run.mode
    token = f"bench-{secrets.token_hex(16)}"
    config = cluster_config(mode, model_dir, args.chunk_tokens, token)
    launcher = Launcher(config, echo=lambda m: print(f"  [{mode}] {m}", flush=True))
    try:
        launcher.start(timeout_s=args.start_timeout_s)
        async with AsyncClient(
            launcher.grpc_target, token=token, timeout_s=args.request_timeout_s
        ) as client:
            print(f"  [{mode}] warming up", flush=True)
            await warm_up(client, plan.warmup, args.request_timeout_s)
            await wait_idle(client, 60.0)
            for rate in plan.rates:
                meter = CpuMeter()
                records = await run_rate(
                    client,
                    plan.requests[rate],
                    plan.offsets[rate],
                    request_timeout_s=args.request_timeout_s,
                    deadline_s=args.drain_s,
                )
                run.cpu[rate] = meter.use()
                run.records[rate] = records
                summary = RateSummary.of(rate, records, slo)
                run.summaries.append(summary)
                print(rate_row(mode, summary, run.cpu[rate]), flush=True)
                save()
                if not await wait_idle(client, 120.0):
                    print(f"  [{mode}] cluster not idle 120 s after rate {rate:g}", flush=True)
    except Exception as e:  # keep the other mode and what this one measured
        logger.exception("%s run failed", mode)
        run.error = f"{type(e).__name__}: {e}"
    finally:
        launcher.stop()


# ---- main ---------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.serving",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a random 4-layer model (smoke run)")
    p.add_argument("--quick", action="store_true", help="rates 0.2,0.5 with 8 requests each")
    p.add_argument("--mix", default="prompt-heavy", choices=sorted(MIXES))
    p.add_argument("--prompt-len", help="prompt length spec, replaces the mix's")
    p.add_argument("--output-len", help="output length spec, replaces the mix's")
    p.add_argument("--rates", type=_floats, default=None, help="req/s, comma-separated")
    p.add_argument("--requests", type=int, default=None, help="requests per rate (24)")
    p.add_argument("--burstiness", type=float, default=1.0, help="Gamma shape; 1 = Poisson")
    p.add_argument("--ttft-slo-ms", type=float, default=TTFT_SLO_MS)
    p.add_argument("--tpot-slo-ms", type=float, default=TPOT_SLO_MS)
    p.add_argument("--attainment", type=float, default=0.9, help="goodput's attainment goal")
    p.add_argument("--slo-scales", type=_floats, default=[0.5, 0.75, 1.0, 1.5, 2.0])
    p.add_argument("--modes", default=",".join(MODES), help="which modes, in order")
    p.add_argument("--chunk-tokens", type=int, default=512, help="colocated prefill chunk")
    p.add_argument("--request-timeout-s", type=float, default=300.0)
    p.add_argument("--drain-s", type=float, default=180.0, help="after a rate's last arrival")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    args.rates = args.rates or ([0.2, 0.5] if args.quick else list(DEFAULT_RATES))
    args.requests = args.requests or (8 if args.quick else 24)
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if any(m not in MODES for m in args.modes):
        p.error(f"--modes: choose from {', '.join(MODES)}")
    return args


def _floats(text: str) -> list[float]:
    return sorted(float(x) for x in text.split(",") if x.strip())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    mix = Mix.build(args.mix, args.prompt_len, args.output_len)
    slo = Slo(args.ttft_slo_ms / 1000.0, args.tpot_slo_ms / 1000.0)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"serving-{stamp}.json"
    runs: dict[str, ModeRun] = {}

    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        model_dir = _model_dir(args, Path(tmp))
        from engine.config import ModelConfig

        plan = make_plan(args, mix, ModelConfig.from_dir(model_dir).vocab_size)
        print(
            f"model {model_dir}\nmix {mix.describe()}\nrates {list(plan.rates)} req/s, "
            f"{args.requests} requests each, burstiness {args.burstiness:g}\n"
            f"SLO: TTFT {args.ttft_slo_ms:g} ms, TPOT {args.tpot_slo_ms:g} ms, "
            f"goal {args.attainment:.0%}\n{HEADER}",
            flush=True,
        )

        def save() -> None:
            payload = finite(to_json(runs, slo, args, mix, model_dir))
            out.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n")

        began = time.monotonic()
        try:
            for mode in args.modes:
                runs[mode] = ModeRun(mode)
                asyncio.run(run_mode(runs[mode], plan, args, model_dir, slo, save))
                save()
        except KeyboardInterrupt:  # report what was measured so far
            print("\ninterrupted", flush=True)
        print_report(runs, slo, args)
        save()
        title = (
            f"{mix.describe()}; SLO TTFT {args.ttft_slo_ms:g} ms, TPOT "
            f"{args.tpot_slo_ms:g} ms; {args.requests} req/rate; {os.cpu_count()} CPUs"
        )
        cdf = serving_plots.plot_cdfs(
            {m: r.records for m, r in runs.items()},
            out.with_name(f"serving-{stamp}-cdf.png"),
            title,
        )
        att = serving_plots.plot_attainment(
            {m: r.summaries for m, r in runs.items()},
            args.attainment,
            out.with_name(f"serving-{stamp}-slo.png"),
            title,
        )
    print(f"\nwrote {out}\n      {cdf}\n      {att}\n({(time.monotonic() - began) / 60:.1f} min)")
    return 0 if all(r.error is None for r in runs.values()) else 1


def _model_dir(args: argparse.Namespace, tmp: Path) -> str:
    if args.tiny:
        from benchmarks.router_overhead import tiny_model

        return str(tiny_model(tmp))
    from engine.model_source import resolve_model

    return str(resolve_model(args.model))


if __name__ == "__main__":
    sys.exit(main())
