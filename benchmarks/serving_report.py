"""The serving benchmark's results: per-mode runs, the tables it prints, the comparison
of the two modes (goodput ratio, P99 TPOT ratio, targets) and the JSON record.

`ModeRun` holds what one mode measured: per rate, the requests' `StreamRecord`s, their
`RateSummary` under the run's SLOs, and the host CPU used meanwhile. Everything else
here is derived from those, so a goodput under other SLOs (`--slo-scales`) is a
recomputation, not another run.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.serving_driver import CpuUse
from benchmarks.slo import Goodput, RateSummary, Slo, StreamRecord, goodput
from benchmarks.workload import Mix

MODES = ("disaggregated", "colocated")
TPOT_RATIO_TARGET = 1.5
GOODPUT_RATIO_TARGET = 1.3


@dataclass
class ModeRun:
    mode: str
    summaries: list[RateSummary] = field(default_factory=list)
    records: dict[float, list[StreamRecord]] = field(default_factory=dict)
    cpu: dict[float, CpuUse] = field(default_factory=dict)
    error: str | None = None

    def goodput(self, slo: Slo, goal: float) -> Goodput:
        return goodput(
            [
                (s.rate, RateSummary.of(s.rate, self.records[s.rate], slo).attainment)
                for s in self.summaries
            ],
            goal,
        )


HEADER = (
    f"{'mode':<14}{'rate':>5}{'ok':>6}{'SLO':>6}{'TTFT':>6}{'TPOT':>6}"
    f"{'TTFT p50/p90/p99 s':>21}{'TPOT p50/p90/p99 ms':>21}{'ITL p50/p90/p99 ms':>21}"
    f"{'E2E p50/p90/p99 s':>21}{'tok/s':>7}{'other':>6}"
)


def rate_row(mode: str, s: RateSummary, cpu: CpuUse) -> str:
    def trio(d: Any, scale: float, fmt: str) -> str:
        return "/".join(format(d.p_ms[p] * scale, fmt) for p in (50, 90, 99))

    return (
        f"{mode:<14}{s.rate:>5g}{f'{s.ok}/{s.sent}':>6}{s.attainment:>6.0%}"
        f"{s.ttft_attainment:>6.0%}{s.tpot_attainment:>6.0%}"
        f"{trio(s.ttft, 1e-3, '.2f'):>21}{trio(s.tpot, 1, '.0f'):>21}"
        f"{trio(s.itl, 1, '.0f'):>21}{trio(s.e2e, 1e-3, '.2f'):>21}"
        f"{s.output_tok_s:>7.1f}{cpu.others:>6.2f}"
    )


DECODING_ENGINES = {"disaggregated": 1, "colocated": 2}


def breakdown(mode: str, records: list[StreamRecord]) -> dict[str, float]:
    """Medians of the server's TTFT breakdown and TPOT, and how many sequences each
    decoding engine held on average (decode-phase time over the rate's duration)."""
    good = [r for r in records if r.ok and r.server]

    def med(key: str) -> float:
        xs = [float(r.server[key]) for r in good if key in r.server]
        return statistics.median(xs) if xs else math.nan

    decoding = sum((r.e2e or 0.0) - (r.ttft or 0.0) for r in good)
    ends = [r.sent + (r.e2e or 0.0) for r in good]
    span = max(ends, default=0.0) - min((r.sent for r in good), default=0.0)
    return {
        "queue_ms": med("queue_ms"),
        "prefill_ms": med("prefill_ms"),
        "kv_transfer_ms": med("kv_transfer_ms"),
        "server_tpot_ms": med("mean_tpot_ms"),
        "decoding_per_engine": decoding / span / DECODING_ENGINES[mode] if span > 0 else 0.0,
    }


BREAKDOWN_HEADER = (
    f"{'mode':<14}{'rate':>5}{'queue ms':>10}{'prefill ms':>12}{'kv ms':>8}"
    f"{'server TPOT ms':>16}{'decoding seqs/engine':>22}{'our CPUs':>10}{'other CPUs':>12}"
)


def breakdown_row(mode: str, rate: float, b: dict[str, float], cpu: CpuUse) -> str:
    return (
        f"{mode:<14}{rate:>5g}{b['queue_ms']:>10.0f}{b['prefill_ms']:>12.0f}"
        f"{b['kv_transfer_ms']:>8.1f}{b['server_tpot_ms']:>16.0f}"
        f"{b['decoding_per_engine']:>22.2f}{cpu.ours:>10.2f}{cpu.others:>12.2f}"
    )


def comparison(
    runs: dict[str, ModeRun], slo: Slo, goal: float, scales: list[float] | None = None
) -> dict[str, Any]:
    out: dict[str, Any] = {"goodput": {m: r.goodput(slo, goal).as_json() for m, r in runs.items()}}
    if not all(m in runs for m in MODES):
        return out
    dis, col = runs["disaggregated"], runs["colocated"]
    g_dis, g_col = dis.goodput(slo, goal), col.goodput(slo, goal)
    out["goodput_ratio"] = _ratio(g_dis.interpolated, g_col.interpolated)
    out["goodput_ratio_swept"] = _ratio(g_dis.rate, g_col.rate)
    out["goodput_ratio_note"] = _bounds_note(g_dis, g_col)
    tpot: dict[str, float | None] = {}
    for d in dis.summaries:
        c = next((c for c in col.summaries if c.rate == d.rate), None)
        if c is not None:
            tpot[f"{d.rate:g}"] = _ratio(c.tpot.p_ms[99], d.tpot.p_ms[99])
    out["p99_tpot_ratio_by_rate"] = tpot
    out["targets"] = {
        "p99_tpot_ratio_min": TPOT_RATIO_TARGET,
        "p99_tpot_met_at_every_rate": bool(tpot)
        and all(v is not None and v >= TPOT_RATIO_TARGET for v in tpot.values()),
        "p99_tpot_met_at_some_rate": any(
            v is not None and v >= TPOT_RATIO_TARGET for v in tpot.values()
        ),
        "goodput_ratio_min": GOODPUT_RATIO_TARGET,
        "goodput_met": (out["goodput_ratio"] or 0.0) >= GOODPUT_RATIO_TARGET,
    }
    out["slo_scales"] = []
    for scale in scales or []:
        scaled = slo.scaled(scale)
        gd, gc = dis.goodput(scaled, goal), col.goodput(scaled, goal)
        out["slo_scales"].append(
            {
                "scale": scale,
                "ttft_ms": scaled.ttft_s * 1000,
                "tpot_ms": scaled.tpot_s * 1000,
                "disaggregated": gd.describe(),
                "colocated": gc.describe(),
                "ratio": _ratio(gd.interpolated, gc.interpolated),
                "note": _bounds_note(gd, gc),
            }
        )
    return out


def _bounds_note(dis: Goodput, col: Goodput) -> str:
    """Whether a goodput ratio means anything when goodputs lie outside the sweep."""
    if dis.below_sweep and col.below_sweep:
        return "both below the lowest rate: no ratio"
    if dis.above_sweep and col.above_sweep:
        return "both at or above the highest rate: no ratio"
    if dis.above_sweep or col.below_sweep:
        return "a lower bound"
    if dis.below_sweep or col.above_sweep:
        return "an upper bound"
    return ""


def _ratio(a: float, b: float) -> float | None:
    if math.isnan(a) or math.isnan(b) or b == 0:
        return math.inf if b == 0 and a > 0 else None
    return a / b


def print_report(runs: dict[str, ModeRun], slo: Slo, args: argparse.Namespace) -> None:
    print(f"\n{HEADER}")
    for mode, run in runs.items():
        for s in run.summaries:
            print(rate_row(mode, s, run.cpu[s.rate]))
    print(f"\nserver side (medians) and load\n{BREAKDOWN_HEADER}")
    for mode, run in runs.items():
        for s in run.summaries:
            print(
                breakdown_row(mode, s.rate, breakdown(mode, run.records[s.rate]), run.cpu[s.rate])
            )
    cmp = comparison(runs, slo, args.attainment, args.slo_scales)
    print(
        f"\ngoodput (>= {args.attainment:.0%} of requests within TTFT {slo.ttft_s:g} s "
        f"and TPOT {slo.tpot_s * 1000:g} ms):"
    )
    for mode, run in runs.items():
        note = f"   (run failed: {run.error})" if run.error else ""
        print(f"  {mode:<14} {run.goodput(slo, args.attainment).describe()} req/s{note}")
    if "goodput_ratio" not in cmp:
        return
    note = f"; {cmp['goodput_ratio_note']}" if cmp["goodput_ratio_note"] else ""
    print(
        f"goodput ratio (disaggregated / colocated): {_fmt(cmp['goodput_ratio'])} "
        f"(swept rates: {_fmt(cmp['goodput_ratio_swept'])}{note})"
    )
    by_rate = ", ".join(f"{r} req/s: {_fmt(v)}" for r, v in cmp["p99_tpot_ratio_by_rate"].items())
    print(f"P99 TPOT ratio (colocated / disaggregated): {by_rate}")
    t = cmp["targets"]
    print(
        f"targets: P99 TPOT ratio >= {TPOT_RATIO_TARGET} at every rate: "
        f"{'met' if t['p99_tpot_met_at_every_rate'] else 'NOT met'} "
        f"(at some rate: {'yes' if t['p99_tpot_met_at_some_rate'] else 'no'}); "
        f"goodput ratio >= {GOODPUT_RATIO_TARGET}: {'met' if t['goodput_met'] else 'NOT met'}"
    )
    print("\ngoodput with both SLOs scaled (same requests):")
    for row in cmp["slo_scales"]:
        note = f" ({row['note']})" if row["note"] else ""
        print(
            f"  x{row['scale']:<4g} TTFT {row['ttft_ms'] / 1000:5.1f} s, TPOT "
            f"{row['tpot_ms']:4.0f} ms: disaggregated {row['disaggregated']}, colocated "
            f"{row['colocated']}, ratio {_fmt(row['ratio'])}{note}"
        )


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else ("inf" if math.isinf(v) else f"{v:.2f}")


def to_json(
    runs: dict[str, ModeRun], slo: Slo, args: argparse.Namespace, mix: Mix, model_dir: str
) -> dict[str, Any]:
    import torch

    return {
        "benchmark": "serving",
        "args": {k: v for k, v in vars(args).items() if k != "func"},
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "cpus_usable": len(os.sched_getaffinity(0)),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
        "commit": _commit(),
        "model_dir": model_dir,
        "mix": {"name": mix.name, "prompt": mix.prompt.spec, "output": mix.output.spec},
        "slo": {
            "ttft_ms": slo.ttft_s * 1000,
            "tpot_ms": slo.tpot_s * 1000,
            "attainment": args.attainment,
        },
        "cpu_split": "each engine replica: 1 Ray CPU, 1 torch thread; router 1 Ray CPU; "
        "local Ray 3 logical CPUs on the host's cores",
        "modes": {
            m: {
                "error": r.error,
                "rates": [
                    _summary_json(m, s, r.cpu.get(s.rate), r.records[s.rate]) for s in r.summaries
                ],
            }
            for m, r in runs.items()
        },
        "comparison": comparison(runs, slo, args.attainment, args.slo_scales),
    }


def _summary_json(
    mode: str, s: RateSummary, cpu: CpuUse | None, recs: list[StreamRecord]
) -> dict[str, Any]:
    return {
        "rate": s.rate,
        "sent": s.sent,
        "ok": s.ok,
        "duration_s": s.duration_s,
        "attainment": s.attainment,
        "ttft_attainment": s.ttft_attainment,
        "tpot_attainment": s.tpot_attainment,
        "output_tok_s": s.output_tok_s,
        "ttft": s.ttft.as_json(),
        "tpot": s.tpot.as_json(),
        "itl": s.itl.as_json(),
        "e2e": s.e2e.as_json(),
        "cpu": cpu.as_json() if cpu else None,
        "server": breakdown(mode, recs),
        "requests": [r.as_json() for r in recs],
    }


def _commit() -> str:
    done = subprocess.run(
        ["git", "rev-parse", "HEAD"],
        cwd=Path(__file__).parent,
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    return done.stdout.strip() or "unknown"


def finite(value: Any) -> Any:
    """JSON-ready: NaN and infinity become null, paths strings."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value
