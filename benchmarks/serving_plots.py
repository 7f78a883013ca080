"""PNG plots of a serving benchmark run (matplotlib, no display needed).

* `plot_cdfs`: latency CDFs (TTFT, TPOT, ITL, E2E), one panel each; colour is the
  mode, and each swept rate is one line, darker for higher rates.
* `plot_attainment`: SLO attainment against request rate, one line per mode (both
  SLOs solid; TTFT-only dashed and TPOT-only dotted, to show which SLO binds), the
  attainment goal as a horizontal line; next to it P99 TTFT and P99 TPOT against rate.

Both take the per-mode records and summaries that `benchmarks.serving` collected.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from benchmarks.slo import RateSummary, StreamRecord

COLORS = {"disaggregated": "tab:blue", "colocated": "tab:orange"}
Records = Mapping[str, Mapping[float, Sequence[StreamRecord]]]  # mode -> rate -> records


def _values(records: Sequence[StreamRecord], metric: str) -> list[float]:
    good = [r for r in records if r.ok]
    if metric == "ITL":
        return [x * 1000.0 for r in good for x in r.itls()]
    pick = {"TTFT": "ttft", "TPOT": "tpot", "E2E": "e2e"}[metric]
    return [v * 1000.0 for r in good if (v := getattr(r, pick)) is not None]


def plot_cdfs(records: Records, path: Path, title: str) -> Path:
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    for ax, metric in zip(axes.flat, ("TTFT", "TPOT", "ITL", "E2E"), strict=True):
        for mode, by_rate in records.items():
            rates = sorted(by_rate)
            for i, rate in enumerate(rates):
                xs = sorted(_values(by_rate[rate], metric))
                if not xs:
                    continue
                ys = [(k + 1) / len(xs) for k in range(len(xs))]
                shade = 0.35 + 0.65 * (i + 1) / len(rates)
                ax.step(
                    xs,
                    ys,
                    where="post",
                    color=COLORS.get(mode),
                    alpha=shade,
                    label=f"{mode} {rate:g} req/s",
                )
        ax.set_title(f"{metric} CDF")
        ax.set_xlabel("ms")
        ax.set_ylabel("fraction of requests" if metric != "ITL" else "fraction of tokens")
        ax.set_xscale("log")
        ax.grid(True, which="both", alpha=0.3)
    axes.flat[0].legend(fontsize=7, loc="lower right")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_attainment(
    summaries: Mapping[str, Sequence[RateSummary]], goal: float, path: Path, title: str
) -> Path:
    fig, (att, ttft, tpot) = plt.subplots(1, 3, figsize=(15, 4.5))
    for mode, rows in summaries.items():
        rows = sorted(rows, key=lambda s: s.rate)
        rates = [s.rate for s in rows]
        color = COLORS.get(mode)
        att.plot(rates, [s.attainment for s in rows], "o-", color=color, label=f"{mode}: both")
        att.plot(
            rates,
            [s.ttft_attainment for s in rows],
            "--",
            color=color,
            alpha=0.6,
            label=f"{mode}: TTFT only",
        )
        att.plot(
            rates,
            [s.tpot_attainment for s in rows],
            ":",
            color=color,
            alpha=0.6,
            label=f"{mode}: TPOT only",
        )
        ttft.plot(rates, [s.ttft.p_ms[99] / 1000.0 for s in rows], "o-", color=color, label=mode)
        tpot.plot(rates, [s.tpot.p_ms[99] for s in rows], "o-", color=color, label=mode)
    att.axhline(goal, color="gray", linewidth=1)
    att.set_ylim(-0.02, 1.02)
    att.set_title(f"SLO attainment (goal {goal:.0%})")
    att.set_ylabel("requests meeting the SLO")
    ttft.set_title("P99 TTFT")
    ttft.set_ylabel("s")
    tpot.set_title("P99 TPOT")
    tpot.set_ylabel("ms")
    for ax in (att, ttft, tpot):
        ax.set_xlabel("request rate (req/s)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
