"""The planner's validation: the simulator against queueing theory, against DistServe's
toy example, and (given a profile and a serving benchmark run) against real runs.

    python -m benchmarks.planner                      # queueing + DistServe (about 1 min)
    python -m benchmarks.planner --profile P.json --serving R.json   # + simulator vs real

Queueing: one replica, one prompt per step, a deterministic service of 0.1 s and
Poisson arrivals is an M/D/1 queue, whose mean wait is W = rho / (2 mu (1 - rho))
(Pollaczek-Khinchine). The simulated mean wait over 20000 requests (seed 3) is compared
with W at several rho. D/D/1: arrivals every 0.05 s against 0.1 s of service must give
request i exactly i * 0.05 s of wait.

DistServe (OSDI'24, Section 2 and Figure 1: 13B model on one A100, 512 in / 64 out,
P90 TTFT 0.4 s and P90 TPOT 0.04 s): step times from DistServe's published A100 vLLM
profile of OPT-13B, the decode side scaled once to the paper's decoding-only rate (all
figures and the file they come from in `planner.distserve`). Goodput, as DistServe
defines it, is bisected on 1000 requests (seed 1) for each setup and compared with the
paper: prefill-only 5.6 rps, decoding-only 10 rps (the calibrated one), colocated 1.6
rps, 2 prefill + 1 decoding 10 rps (3.3 per GPU). The search then plans the same
example for 3 GPUs. A plot shows attainment against rate for the colocated and 2P1D
setups.

Simulator against real runs (`--profile`, `--serving`): the requests of a
`benchmarks.serving` run (their lengths from its records, their arrival offsets
rebuilt from its seed exactly as it drew them) are replayed on the simulator with the
profile's step times, for the layouts the benchmark ran (colocated: 2 replicas with a
chunk budget of `--chunk-tokens`; disaggregated: 1 prefill + 1 decode, threshold 64),
and the predicted P90 TTFT and P90 TPOT are set against the measured ones per rate.

Output: the tables, JSON `benchmarks/results/planner-<stamp>.json` and the plots next
to it.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.planner_real import compare_real, plot_real
from benchmarks.workload import Mix
from planner import distserve
from planner.costs import DecodeCost, PrefillCost, StepCost
from planner.layout import Layout, PoolShape
from planner.plots import plot_goodput_curves
from planner.search import SearchSpace, search
from planner.simulator import ClusterModel, simulate
from planner.workload import SimRequest, Workload

RESULTS = Path(__file__).parent / "results"


def queueing(requests: int) -> dict[str, Any]:
    service = 0.1
    model = ClusterModel(lambda tp, pp: StepCost(PrefillCost(service, 0, 0), DecodeCost(0, 0, 0)))
    layout = Layout(PoolShape(1), max_batched_tokens=100, max_num_seqs=1)
    workload = Workload.from_mix(Mix.parse("fixed:100", "fixed:1"))
    rows = []
    print("\nM/D/1, service 0.1 s, Poisson arrivals, mean wait (s):")
    print(f"{'rho':>5} {'simulated':>10} {'formula':>10} {'error':>8}")
    for rho in (0.3, 0.5, 0.7, 0.8, 0.9):
        mu = 1 / service
        result = simulate(layout, model, workload.at_rate(rho * mu, requests, seed=3))
        wait = result.mean_ttft() - service
        formula = rho / (2 * mu * (1 - rho))
        rows.append({"rho": rho, "simulated_s": wait, "formula_s": formula})
        print(f"{rho:>5.1f} {wait:>10.4f} {formula:>10.4f} {wait / formula - 1:>+8.1%}")
    overloaded = [SimRequest(0.05 * i, 100, 1) for i in range(200)]
    ttfts = [r.ttft for r in simulate(layout, model, overloaded).requests]
    dd1 = max(abs(t - (service + 0.05 * i)) for i, t in enumerate(ttfts))
    print(f"D/D/1 (arrivals every 0.05 s, service 0.1 s): largest TTFT error {dd1:.2e} s")
    return {"md1": rows, "dd1_max_abs_error_s": dd1}


def distserve_rows(requests: int, out: Path, stamp: str) -> dict[str, Any]:
    print("\nDistServe toy example (13B, A100, 512/64, P90 TTFT 0.4 s, P90 TPOT 0.04 s):")
    print(f"{'setup':<24} {'sim rps':>8} {'per GPU':>8} {'paper/GPU':>10} {'error':>8}")
    rows: list[dict[str, Any]] = []
    for setup in distserve.SETUPS:
        row = distserve.run(setup, requests)
        rows.append(
            {"setup": setup.name, "rps": row.rps, "per_gpu": row.rps_per_gpu,
             "paper_per_gpu": setup.paper_rps_per_gpu, "error": row.error}
        )  # fmt: skip
        print(
            f"{setup.name:<24} {row.rps:>8.2f} {row.rps_per_gpu:>8.2f} "
            f"{setup.paper_rps_per_gpu:>10.2f} {row.error:>+8.1%}"
        )
    by = {r["setup"]: r for r in rows}
    ratio = by["2 prefill + 1 decoding"]["per_gpu"] / by["colocated, 1 GPU"]["per_gpu"]
    print(f"2P1D / colocated per GPU: {ratio:.2f}x (paper 2.1x)")
    curves = {}
    for setup in distserve.SETUPS[2:]:
        rates = [r / 4 * setup.paper_rps for r in range(1, 9)]
        curves[setup.name] = [
            (rate, simulate(setup.layout, distserve.MODEL,
                            distserve.WORKLOAD.at_rate(rate, requests, 1)).attainment(setup.slo))
            for rate in rates
        ]  # fmt: skip
    plot = plot_goodput_curves(
        curves, 0.9, out / f"planner-{stamp}-distserve.png", "DistServe toy example, simulated"
    )
    print("\nplan for the example, 3 GPUs (colocated engines with chunked prefill):")
    space = SearchSpace(3, thresholds=(0,), max_num_seqs=256)
    found = search(distserve.MODEL, distserve.WORKLOAD, distserve.SLO, space, requests=400)
    for c in found.ranked:
        print(f"  {c.layout.describe():<24} {c.goodput:6.2f} rps, {c.per_device:5.2f} per GPU")
    return {
        "rows": rows,
        "ratio": ratio,
        "curves": curves,
        "plot": str(plot),
        "plan": [
            {"layout": c.layout.describe(), "goodput": c.goodput, "per_device": c.per_device}
            for c in found.ranked
        ],
        "decode_scale": distserve.DECODE_SCALE,
        "prefill": asdict(distserve.PREFILL),
        "decode": asdict(distserve.DECODE),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.planner",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--queue-requests", type=int, default=20000)
    p.add_argument("--distserve-requests", type=int, default=1000)
    p.add_argument("--profile", type=Path, help="a profile JSON (pdserve profile)")
    p.add_argument("--serving", type=Path, help="a benchmarks.serving results JSON")
    p.add_argument("--chunk-tokens", type=int, default=512, help="the serving run's chunk")
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    if (args.profile is None) != (args.serving is None):
        p.error("--profile and --serving go together")
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"benchmark": "planner"}
    report["queueing"] = queueing(args.queue_requests)
    report["distserve"] = distserve_rows(args.distserve_requests, args.out, stamp)
    if args.profile is not None:
        real = compare_real(args.profile, args.serving, args.chunk_tokens)
        report["real"] = real
        report["real_plot"] = str(plot_real(real, args.out / f"planner-{stamp}-real.png"))
    path = args.out / f"planner-{stamp}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
