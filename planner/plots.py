"""PNG plots of a profile and of the planner's validation (matplotlib, no display).

* `plot_profile`: per TP/PP layout, prefill seconds against prompt tokens (one colour
  per batch), decode step seconds against batch (one colour per context), and the
  transfer's seconds against MB; measured points as dots, the fitted model as lines.
* `plot_goodput_curves`: SLO attainment against rate, one line per setup, with the
  attainment goal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from planner.profile import Profile


def plot_profile(profile: Profile, path: Path) -> Path:
    rows = len(profile.layouts)
    fig, axes = plt.subplots(rows, 3, figsize=(14, 3.8 * rows), squeeze=False)
    for row, lp in zip(axes, profile.layouts, strict=True):
        cost = lp.step_cost()
        ax = row[0]
        for i, batch in enumerate(sorted({p.batch for p in lp.prefill_points})):
            pts = sorted((p.tokens, p.seconds) for p in lp.prefill_points if p.batch == batch)
            xs = [x for x, _ in pts]
            ax.plot(xs, [s for _, s in pts], "o", color=f"C{i}", label=f"batch {batch}")
            grid = list(range(1, max(xs) + 1, max(1, max(xs) // 64)))
            ax.plot(grid, [cost.prefill.time([(n, 0)] * batch) for n in grid], "-", color=f"C{i}")
        ax.set(
            xlabel="prompt tokens", ylabel="prefill step s", title=f"prefill tp{lp.tp} pp{lp.pp}"
        )
        ax.legend(fontsize=8)
        ax = row[1]
        for i, ctx in enumerate(sorted({p.context for p in lp.decode_points})):
            pts = sorted((p.batch, p.seconds) for p in lp.decode_points if p.context == ctx)
            xs = [x for x, _ in pts]
            ax.plot(xs, [s for _, s in pts], "o", color=f"C{i}", label=f"context {ctx}")
            grid = list(range(1, max(xs) + 1))
            ax.plot(grid, [cost.decode.time(b, b * ctx) for b in grid], "-", color=f"C{i}")
        ax.set(xlabel="batch", ylabel="decode step s", title=f"decode tp{lp.tp} pp{lp.pp}")
        ax.legend(fontsize=8)
        ax = row[2]
        if profile.transfer is not None:
            tr = profile.transfer
            mb = [p.nbytes / 1e6 for p in tr.points]
            ax.plot(mb, [p.seconds for p in tr.points], "o", label="measured")
            top = max(p.nbytes for p in tr.points)
            sizes = [top * k // 50 for k in range(1, 51)]
            ax.plot([g / 1e6 for g in sizes], [tr.cost().time(g) for g in sizes], "-", label="fit")
            ax.set(xlabel="MB", ylabel="seconds", title=f"KV transfer ({tr.transport})")
            ax.legend(fontsize=8)
        else:
            ax.set_axis_off()
    fig.suptitle(f"{profile.model} {profile.dtype} on {profile.device}, {profile.created}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def plot_goodput_curves(
    curves: Mapping[str, Sequence[tuple[float, float]]], goal: float, path: Path, title: str
) -> Path:
    """`curves`: setup name -> (rate, attainment) points."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, pts in curves.items():
        pts = sorted(pts)
        ax.plot([r for r, _ in pts], [a * 100 for _, a in pts], "o-", label=name)
    ax.axhline(goal * 100, color="grey", linestyle="--", label=f"goal {goal:.0%}")
    ax.set(xlabel="request rate (req/s)", ylabel="SLO attainment %", title=title, ylim=(0, 102))
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
