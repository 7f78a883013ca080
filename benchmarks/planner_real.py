"""The simulator against a real `benchmarks.serving` run (see benchmarks/planner.py).

The run's JSON holds, per mode and rate, every request's prompt tokens and output
length in sending order, and its arguments (seed, rates, requests, burstiness); the
arrival offsets are drawn again exactly as `benchmarks.serving.make_plan` drew them.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.slo import percentile
from benchmarks.workload import arrival_offsets
from planner.layout import Layout, PoolShape
from planner.metrics import Slo
from planner.profile import Profile
from planner.simulator import simulate
from planner.workload import SimRequest


def mode_layout(mode: str, chunk_tokens: int) -> Layout:
    if mode == "colocated":
        return Layout(PoolShape(2), max_batched_tokens=chunk_tokens)
    return Layout(PoolShape(1), PoolShape(1), threshold=64)


def compare_real(profile_path: Path, serving_path: Path, chunk_tokens: int) -> dict[str, Any]:
    profile = Profile.load(profile_path)
    model = profile.cluster_model()
    run = json.loads(serving_path.read_text())
    args = run["args"]
    slo = Slo(run["slo"]["ttft_ms"] / 1000, run["slo"]["tpot_ms"] / 1000, 90)
    rates = sorted(args["rates"])
    rows = []
    print(f"\nsimulator vs real run {serving_path.name} (profile {profile_path.name}):")
    print(
        f"{'mode':<14} {'rate':>5} {'P90 TTFT s sim/real':>21} {'err':>7} "
        f"{'P90 TPOT ms sim/real':>21} {'err':>7} {'attain sim/real':>16}"
    )
    for mode, data in run["modes"].items():
        for summary in data["rates"]:
            rate = summary["rate"]
            offsets = arrival_offsets(
                len(summary["requests"]),
                rate,
                args["burstiness"],
                random.Random(args["seed"] + 1000 + rates.index(rate)),
            )
            reqs = [
                SimRequest(t, r["prompt_tokens"], r["output_len"])
                for t, r in zip(offsets, summary["requests"], strict=True)
            ]
            sim = simulate(mode_layout(mode, chunk_tokens), model, reqs)
            row = {
                "mode": mode,
                "rate": rate,
                "sim_ttft_p90_s": sim.ttft_p(90),
                "real_ttft_p90_s": _real_p90(summary["requests"], "ttft_s"),
                "sim_tpot_p90_s": sim.tpot_p(90),
                "real_tpot_p90_s": _real_p90(summary["requests"], "tpot_s"),
                "sim_attainment": sim.attainment(slo),
                "real_attainment": summary["attainment"],
            }
            rows.append(row)
            ttft_err = row["sim_ttft_p90_s"] / row["real_ttft_p90_s"] - 1
            tpot_err = row["sim_tpot_p90_s"] / row["real_tpot_p90_s"] - 1
            sim_ttft, real_ttft = row["sim_ttft_p90_s"], row["real_ttft_p90_s"]
            print(
                f"{mode:<14} {rate:>5.2f} {sim_ttft:>10.2f}/{real_ttft:<10.2f}"
                f" {ttft_err:>+7.0%} {row['sim_tpot_p90_s'] * 1e3:>10.0f}/"
                f"{row['real_tpot_p90_s'] * 1e3:<10.0f} {tpot_err:>+7.0%} "
                f"{row['sim_attainment']:>7.0%}/{row['real_attainment']:<7.0%}"
            )
    return {"serving": str(serving_path), "profile": str(profile_path), "rows": rows}


def _real_p90(requests: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in requests if r["ok"] and r[key] is not None]
    return percentile(values, 90) if values else math.nan


def plot_real(real: dict[str, Any], path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for i, mode in enumerate(sorted({r["mode"] for r in real["rows"]})):
        rows = sorted((r for r in real["rows"] if r["mode"] == mode), key=lambda r: r["rate"])
        rates = [r["rate"] for r in rows]
        for ax, key, scale in ((axes[0], "ttft_p90_s", 1.0), (axes[1], "tpot_p90_s", 1e3)):
            ax.plot(rates, [r[f"real_{key}"] * scale for r in rows], "o-", color=f"C{i}",
                    label=f"{mode} measured")  # fmt: skip
            ax.plot(rates, [r[f"sim_{key}"] * scale for r in rows], "s--", color=f"C{i}",
                    label=f"{mode} simulated")  # fmt: skip
    axes[0].set(xlabel="request rate (req/s)", ylabel="P90 TTFT (s)")
    axes[1].set(xlabel="request rate (req/s)", ylabel="P90 TPOT (ms)")
    for ax in axes:
        ax.legend(fontsize=8)
    fig.suptitle("simulator (profile) against the serving benchmark")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
