"""The controller against fixed layouts on a real cluster, one shifted run each.

    python -m benchmarks.controller_real [--tiny] [--requests 12] [--rate 0.1]

The same shift as `benchmarks.controller`: the first half of the requests from the
`prompt-heavy` mix, the second half from `decode-heavy`, open-loop Poisson arrivals at
`--rate`, the second half starting one mean gap after the first. Each setup is a
cluster of 3 engine replicas of one CPU each (`pdserve up`'s launcher, SmolLM2 or
`--tiny`): fixed 1P2D, fixed 2P1D, and 2P1D with the controller enabled
(`planner.enabled`, its settings in `PLANNER`). One run per setup at one rate, not a
goodput bisection: each reports SLO attainment (TTFT `--ttft-slo-ms`, TPOT
`--tpot-slo-ms`), P90 TTFT and TPOT, and the CPU the cluster and the rest of the host
used meanwhile (other load on a shared host makes these runs noisy); the controller's
decisions are read from the registry before its cluster stops.

Output: a table and JSON `benchmarks/results/controller-real-<stamp>.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import secrets
import sys
import tempfile
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.controller import FIRST, SECOND
from benchmarks.serving import KV_CACHE, MAX_MODEL_LEN, free_port
from benchmarks.serving_driver import CpuMeter, run_rate, wait_idle, warm_up
from benchmarks.slo import RateSummary, Slo
from benchmarks.workload import Mix, Request, arrival_offsets
from cluster.client import AsyncClient
from cluster.config_file import load_config
from cluster.launcher import Launcher
from registry import Registry, connect

RESULTS = Path(__file__).parent / "results"
SETUPS = {"fixed-1P2D": (1, False), "fixed-2P1D": (2, False), "controller-2P1D": (2, True)}
PLANNER = [
    "planner.enabled=true",
    "planner.fast_period_s=2",
    "planner.sustain_ticks=2",
    "planner.flip_cooldown_s=60",
    "planner.min_flip_interval_s=10",
    "planner.prefill_full_tokens=1024",
    "planner.decode_full_seqs=4",
]


def workload(n: int, rate: float, seed: int, vocab: int) -> tuple[list[Request], list[float]]:
    half = n // 2
    reqs = Mix.named(FIRST).requests(half, random.Random(seed), vocab, MAX_MODEL_LEN)
    reqs += Mix.named(SECOND).requests(n - half, random.Random(seed + 1), vocab, MAX_MODEL_LEN)
    first = arrival_offsets(half, rate, 1.0, random.Random(seed + 2))
    second = arrival_offsets(n - half, rate, 1.0, random.Random(seed + 3))
    start = first[-1] + 1.0 / rate
    return reqs, first + [start + o for o in second]


def config(name: str, model_dir: str, prefill: int, ctl: bool, token: str, slo: Slo) -> Any:
    pools = [
        f"pools.prefill.replicas={prefill}",
        f"pools.decode.replicas={3 - prefill}",
        f"pools.prefill.engine.kv_cache_bytes={KV_CACHE}",
        f"pools.decode.engine.kv_cache_bytes={KV_CACHE}",
    ]
    planner = [*PLANNER, f"planner.ttft_slo_s={slo.ttft_s}", f"planner.tpot_slo_s={slo.tpot_s}"]
    return load_config(
        None,
        [
            f"name={name}",
            f"model.source={model_dir}",
            f"model.max_model_len={MAX_MODEL_LEN}",
            f"server.grpc_port={free_port()}",
            f"server.http_port={free_port()}",
            "ray.num_cpus=4",
            f"server.grpc_bearer_token={token}",
            *pools,
            *(planner if ctl else []),
        ],
    )


async def run_setup(name: str, args: Any, model_dir: str, plan: Any, slo: Slo) -> dict[str, Any]:
    prefill, ctl = SETUPS[name]
    token = f"bench-{secrets.token_hex(16)}"
    cfg = config(f"bench-{name.lower()}", model_dir, prefill, ctl, token, slo)
    launcher = Launcher(cfg, echo=lambda m: print(f"  [{name}] {m}", flush=True))
    out: dict[str, Any] = {"setup": name}
    try:
        state = launcher.start(timeout_s=args.start_timeout_s)
        async with AsyncClient(launcher.grpc_target, token=token, timeout_s=600) as client:
            await warm_up(client, plan["warmup"], 600)
            await wait_idle(client, 120.0)
            meter = CpuMeter()
            records = await run_rate(
                client, plan["requests"], plan["offsets"], request_timeout_s=600, deadline_s=600
            )
            out["cpu"] = asdict(meter.use())
            out["summary"] = asdict(RateSummary.of(args.rate, records, slo))
        if ctl:
            client_redis = connect(state.redis_url)
            out["decisions"] = Registry(client_redis, cfg.name).routing.decisions()
            client_redis.close()
    except Exception as e:
        logging.exception("%s failed", name)
        out["error"] = f"{type(e).__name__}: {e}"
    finally:
        launcher.stop()
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.controller_real",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--requests", type=int, default=12)
    p.add_argument("--rate", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--ttft-slo-ms", type=float, default=6000.0)
    p.add_argument("--tpot-slo-ms", type=float, default=200.0)
    p.add_argument("--tiny", action="store_true", help="a tiny random model instead")
    p.add_argument("--setups", default=",".join(SETUPS))
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    slo = Slo(args.ttft_slo_ms / 1000, args.tpot_slo_ms / 1000)
    results = []
    with tempfile.TemporaryDirectory(prefix="pdserve-ctl-") as tmp:
        if args.tiny:
            from benchmarks.router_overhead import tiny_model

            model_dir = str(tiny_model(Path(tmp)))
        else:
            from engine.model_source import resolve_model

            model_dir = str(resolve_model("smollm2-135m-instruct"))
        from engine.config import ModelConfig

        vocab = ModelConfig.from_dir(model_dir).vocab_size
        reqs, offsets = workload(args.requests, args.rate, args.seed, vocab)
        warm = Mix.named(FIRST).requests(2, random.Random(args.seed - 1), vocab, MAX_MODEL_LEN)
        plan = {"requests": reqs, "offsets": offsets, "warmup": warm}
        for name in args.setups.split(","):
            results.append(asyncio.run(run_setup(name, args, model_dir, plan, slo)))
    print(f"\n{'setup':<16} {'attain':>7} {'p90 ttft s':>10} {'p90 tpot ms':>11} cluster/other CPU")
    for r in results:
        s = r.get("summary")
        if s is None:
            print(f"{r['setup']:<16} failed: {r.get('error')}")
            continue
        cpu = r["cpu"]
        print(
            f"{r['setup']:<16} {s['attainment']:>7.0%} {s['ttft']['p_ms'][90] / 1000:>10.2f} "
            f"{s['tpot']['p_ms'][90]:>11.0f} {cpu}"
        )
        for d in r.get("decisions", []):
            print(f"    {json.dumps(d, sort_keys=True)}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"controller-real-{stamp}.json"
    path.write_text(json.dumps({"args": vars(args) | {"out": str(args.out)}, "runs": results},
                               indent=1, default=str) + "\n")  # fmt: skip
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
