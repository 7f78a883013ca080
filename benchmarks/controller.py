"""The controller against fixed layouts, on a workload whose mix shifts halfway.

    python -m benchmarks.controller            # a few minutes (about 80 simulations)

The workload: `--requests` requests with Poisson arrivals at one rate, the first half
from the `prompt-heavy` mix and the second half from `decode-heavy`
(`benchmarks.workload`), the second half starting one mean gap after the first
ends. The cluster: `--replicas` engine replicas (the same engines, so the same total
cores, in every setup), each able to serve either role (`planner.switching`). Step
times: DistServe's published A100 profile of OPT-13B (`planner.distserve`) and its
SLOs, P90 TTFT 0.4 s and P90 TPOT 0.04 s; goodput is DistServe's, the highest rate
at which 90% of requests meet both (bisected, `planner.metrics.goodput`).

Fixed layouts: every prefill/decode split of the replicas with the disaggregation
threshold in `THRESHOLDS`, roles never moving. For each half alone the best fixed
layout is found; both are then run on the whole shifted workload, and the better of
the two is the baseline. The best fixed layout for the whole shifted workload (which
no one choosing for either half would pick) is reported too.

The controller: the same policy object the controller actor runs
(`controller.policy.Policy`), every `fast_period_s` of simulated time, starting from
the best layout for the first half. Reported: its goodput, the ratio to the baseline
(the target is 1.2 or more), and, at its goodput rate, its flips and threshold moves
with their times, and the oscillation count: flips of an instance reversed within
its cooldown (must be 0).

Output: the tables, and JSON `benchmarks/results/controller-<stamp>.json`.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.workload import Mix
from controller.policy import Action, ActionKind, Policy
from controller.settings import PlannerConfig
from planner import distserve
from planner.costs import StepCost
from planner.metrics import goodput
from planner.switching import (
    DECODE_POOL,
    PREFILL_POOL,
    SwitchingRun,
    SwitchingSetup,
    simulate_switching,
)
from planner.workload import SimRequest, Workload

RESULTS = Path(__file__).parent / "results"
THRESHOLDS = (0, 64, 256, 1024)
FIRST, SECOND = "prompt-heavy", "decode-heavy"
HIGH_RATE = 60.0  # requests per second: above any setup's goodput here
PLANNER = PlannerConfig(
    ttft_slo_s=distserve.SLO.ttft_s,
    tpot_slo_s=distserve.SLO.tpot_s,
    fast_period_s=1.0,
    slow_period_s=30.0,
    flip_cooldown_s=10.0,
    min_flip_interval_s=3.0,
    decode_full_seqs=32,
    threshold_cooldown_s=5.0,
)


def shifted(rate: float, n: int, seed: int, part: str = "both") -> list[SimRequest]:
    """The first half from FIRST, then the second from SECOND (or one half alone)."""
    a = Workload.from_mix(Mix.named(FIRST)).at_rate(rate, n // 2, seed)
    b = Workload.from_mix(Mix.named(SECOND)).at_rate(rate, n - n // 2, seed + 1)
    if part == "first":
        return a
    if part == "second":
        return b
    start = a[-1].arrival + 1.0 / rate
    return a + [dataclasses.replace(r, arrival=r.arrival + start) for r in b]


def _policy(setup: SwitchingSetup) -> Policy:
    replicas = {PREFILL_POOL: setup.prefill, DECODE_POOL: setup.replicas - setup.prefill}
    return Policy(PLANNER, PREFILL_POOL, DECODE_POOL, replicas, setup.threshold)


def _run(setup: SwitchingSetup, rate: float, args: Any, part: str, ctl: bool) -> SwitchingRun:
    reqs = shifted(rate, args.requests, args.seed, part)
    return simulate_switching(setup, reqs, _policy(setup) if ctl else None)


def _goodput(setup: SwitchingSetup, args: Any, part: str, ctl: bool = False) -> float:
    slo = distserve.SLO
    res = goodput(
        lambda r: _run(setup, r, args, part, ctl).result.attainment(slo), slo.goal, HIGH_RATE
    )
    return res.rate


def oscillations(actions: list[Action], cooldown_s: float) -> int:
    """Flips that reverse the same instance's previous flip within `cooldown_s`."""
    last: dict[str, Action] = {}
    count = 0
    for a in actions:
        if a.kind not in (ActionKind.FLIP, ActionKind.REPAIR):
            continue
        prev = last.get(a.instance_id)
        if prev is not None and a.t - prev.t < cooldown_s and prev.to_role is not a.to_role:
            count += 1
        last[a.instance_id] = a
    return count


def _fixed(args: Any, cost: StepCost) -> list[dict[str, Any]]:
    rows = []
    for prefill in range(1, args.replicas):
        for threshold in THRESHOLDS:
            setup = SwitchingSetup(args.replicas, prefill, cost, threshold, period_s=1.0)
            row = {"layout": setup.describe(), "prefill": prefill, "threshold": threshold}
            for part in ("first", "second", "both"):
                row[part] = _goodput(setup, args, part)
            print(
                f"  {row['layout']:<22} {row['first']:>7.2f} {row['second']:>7.2f} "
                f"{row['both']:>7.2f}",
                flush=True,
            )
            rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.controller",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--replicas", type=int, default=4)
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    cost = StepCost(distserve.PREFILL, distserve.DECODE)
    print(f"goodput (rps) of fixed layouts, {args.replicas} replicas, {args.requests} requests:")
    print(f"  {'layout':<22} {FIRST:>7.7} {SECOND:>7.7} {'shifted':>7}")
    rows = _fixed(args, cost)
    best = {part: max(rows, key=lambda r: r[part]) for part in ("first", "second", "both")}
    baseline = max(best["first"]["both"], best["second"]["both"])
    start = SwitchingSetup(
        args.replicas, best["first"]["prefill"], cost, best["first"]["threshold"], period_s=1.0
    )
    ctl = _goodput(start, args, "both", ctl=True)
    run = _run(start, ctl, args, "both", ctl=True)
    moves = [a.record() for a in run.actions]
    flips = len(run.flips)
    osc = oscillations(run.actions, PLANNER.flip_cooldown_s)
    report = {
        "benchmark": "controller",
        "replicas": args.replicas,
        "requests": args.requests,
        "seed": args.seed,
        "mixes": [FIRST, SECOND],
        "slo": dataclasses.asdict(distserve.SLO),
        "planner": PLANNER.model_dump(),
        "fixed": rows,
        "best_first": best["first"]["layout"],
        "best_second": best["second"]["layout"],
        "best_shifted": best["both"]["layout"],
        "baseline_rps": baseline,
        "best_fixed_shifted_rps": best["both"]["both"],
        "controller_rps": ctl,
        "ratio": ctl / baseline if baseline > 0 else None,
        "ratio_to_best_fixed_shifted": ctl / best["both"]["both"] if best["both"]["both"] else None,
        "flips": flips,
        "oscillations": osc,
        "actions": moves,
        "attainment_at_controller_rps": run.result.attainment(distserve.SLO),
    }
    print(f"\nbest for {FIRST} alone: {best['first']['layout']}; on the shifted run "
          f"{best['first']['both']:.2f} rps")  # fmt: skip
    print(f"best for {SECOND} alone: {best['second']['layout']}; on the shifted run "
          f"{best['second']['both']:.2f} rps")  # fmt: skip
    print(f"best fixed for the shifted run: {best['both']['layout']}, {best['both']['both']:.2f}")
    print(f"controller (from {start.describe()}): {ctl:.2f} rps = {report['ratio']:.2f}x the "
          f"baseline {baseline:.2f}, {report['ratio_to_best_fixed_shifted']:.2f}x the best fixed "
          f"for the shifted run")  # fmt: skip
    print(f"at {ctl:.2f} rps: {flips} flips, {osc} reversed within the cooldown; moves:")
    for m in moves:
        detail = m.get("instance") or f"{m.get('threshold_from')}->{m.get('threshold_to')}"
        print(f"  t={m['t']:>6.1f}s {m['kind']:<9} {detail} {m.get('to_role') or ''}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    path = args.out / f"controller-{stamp}.json"
    path.write_text(json.dumps(report, indent=1) + "\n")
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
