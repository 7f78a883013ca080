"""Drawing the dashboard's panels with matplotlib, in the dashboard's own grid.

`draw(dashboard, data, title)` makes one figure, `DASHBOARD_WIDTH_PX` wide, with each
row's title and each panel's box where its `gridPos` puts it (`grid_rects`): the
panel's title, its series as lines over time (a gap where a series has no point,
as Grafana leaves one), the y axis in the panel's unit, and the legend below the
plot in list mode. `data` maps each panel's index in `dashboard.panels` to its
`Series`. The colours follow Grafana's dark theme and its classic palette.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import matplotlib.dates as mdates
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import FuncFormatter, MultipleLocator

from benchmarks.dashboard_panels import (
    DASHBOARD_WIDTH_PX,
    GRID_ROW_PX,
    Dashboard,
    DashboardError,
    GridPos,
    Rect,
    grid_height,
    grid_rect,
)

DPI = 100
BACKGROUND, PANEL, TEXT, GRID = "#111217", "#181b1f", "#ccccdc", "#2c3235"
PALETTE: tuple[str, ...] = ("#73bf69", "#f2cc0c", "#8ab8ff", "#ff780a", "#f2495c", "#5794f2")
PALETTE += ("#b877d9", "#705da0", "#37872d", "#fade2a", "#447ebc", "#c15c17", "#890f02")
TITLE_PX, LEGEND_ROW_PX, AXIS_PX, Y_LABELS_PX, PAD_PX = 24, 13, 18, 56, 6
HEADER_PX = 60  # the figure's two title lines
LEGEND_COLUMNS = 2
TICKS_S = (10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400)
PNG_COLORS = 128  # the saved figure's palette: a small file, the same look


@dataclass(frozen=True)
class Series:
    name: str  # the legend entry
    times: Sequence[float]  # unix seconds
    values: Sequence[float]  # NaN where Prometheus returned NaN


def _si(value: float, suffixes: Sequence[str], base: float = 1000.0) -> str:
    size, i = abs(value), 0
    while size >= base and i < len(suffixes) - 1:
        size, i = size / base, i + 1
    scaled = value / base**i
    return f"{scaled:.3g}{suffixes[i]}"


def _seconds(v: float) -> str:
    a = abs(v)
    if a == 0:
        return "0"
    if a < 1e-3:
        return f"{v * 1e6:.3g} µs"
    if a < 1:
        return f"{v * 1e3:.3g} ms"
    if a < 60:
        return f"{v:.3g} s"
    return f"{v / 60:.3g} min"


UNITS: dict[str, Callable[[float], str]] = {
    "s": _seconds,
    "percentunit": lambda v: f"{v * 100:.3g}%",
    "percent": lambda v: f"{v:.3g}%",
    "short": lambda v: _si(v, ("", " K", " Mil", " Bil", " Tri")),
    "none": lambda v: f"{v:.3g}",
    "reqps": lambda v: _si(v, (" req/s", "K req/s", "M req/s")),
    "ops": lambda v: _si(v, (" ops/s", "K ops/s", "M ops/s")),
    "Bps": lambda v: _si(v, (" B/s", " kB/s", " MB/s", " GB/s", " TB/s")),
    "bytes": lambda v: _si(v, (" B", " KiB", " MiB", " GiB", " TiB"), 1024.0),
}


def format_value(unit: str, value: float) -> str:
    try:
        return UNITS[unit](value)
    except KeyError:
        raise DashboardError(f"unit {unit!r}: not one of {sorted(UNITS)}") from None


def figure_size_px(dashboard: Dashboard) -> tuple[int, int]:
    return DASHBOARD_WIDTH_PX, grid_height(dashboard) * GRID_ROW_PX + HEADER_PX


def _frac(rect: Rect, size: tuple[int, int], top_px: float) -> Rect:
    """`rect` of the grid area, as figure coordinates below a header `top_px` tall."""
    h = size[1]
    scale = (h - top_px) / h
    return Rect(rect.left, rect.bottom * scale, rect.width, rect.height * scale)


def legend_rows(n: int) -> int:
    return math.ceil(n / LEGEND_COLUMNS)


def plot_rect(box: Rect, size: tuple[int, int], legend_entries: int) -> Rect:
    """The plotting area inside a panel's box: below the title, right of the y
    labels, above the time axis and the legend."""
    w, h = size
    bottom_px = PAD_PX + legend_rows(legend_entries) * LEGEND_ROW_PX + AXIS_PX
    left = box.left + Y_LABELS_PX / w
    bottom = box.bottom + bottom_px / h
    return Rect(
        left,
        bottom,
        box.width - (Y_LABELS_PX + 2 * PAD_PX) / w,
        max(0.01, box.height - (bottom_px + TITLE_PX) / h),
    )


def _panel_box(fig: Figure, box: Rect, size: tuple[int, int]) -> None:
    w, h = size
    m = PAD_PX / 2
    fig.patches.append(
        Rectangle(
            (box.left + m / w, box.bottom + m / h),
            box.width - 2 * m / w,
            box.height - 2 * m / h,
            transform=fig.transFigure,
            facecolor=PANEL,
            edgecolor=GRID,
            linewidth=0.6,
            zorder=-1,
        )
    )


def _draw_series(ax: Axes, series: Sequence[Series], step_s: float) -> None:
    for i, s in enumerate(series):
        xs: list[float] = []
        ys: list[float] = []
        for t, v in zip(s.times, s.values, strict=True):
            if xs and t - xs[-1] > 1.5 * step_s:  # no point here: leave a gap
                xs.append(xs[-1] + step_s)
                ys.append(math.nan)
            xs.append(t)
            ys.append(v)
        dates = [datetime.fromtimestamp(x, UTC) for x in xs]
        color = PALETTE[i % len(PALETTE)]
        ax.plot(dates, ys, color=color, linewidth=1.0, label=s.name)  # type: ignore[arg-type]
        ax.fill_between(dates, ys, color=color, alpha=0.1, linewidth=0)  # type: ignore[arg-type]


def draw(
    dashboard: Dashboard,
    data: Mapping[int, Sequence[Series]],
    window: tuple[float, float],
    step_s: Mapping[int, float],
    title: str,
) -> Figure:
    """The dashboard as one figure; `window` is the time range (unix seconds)."""
    size = figure_size_px(dashboard)
    total = grid_height(dashboard)
    fig = Figure(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, facecolor=BACKGROUND)
    fig.text(0.005, 1 - 6 / size[1], title, color=TEXT, fontsize=10, va="top", linespacing=1.5)
    header = HEADER_PX
    for row in dashboard.rows:
        box = _frac(grid_rect(row.grid, total), size, header)
        fig.text(box.left + 0.004, box.bottom + box.height / 2, row.title, color=TEXT,
                 fontsize=10, fontweight="bold", va="center")  # fmt: skip
    start, end = (datetime.fromtimestamp(t, UTC) for t in window)
    for i, panel in enumerate(dashboard.panels):
        series = data.get(i, ())
        box = _frac(grid_rect(panel.grid, total), size, header)
        _panel_box(fig, box, size)
        fig.text(box.left + 8 / size[0], box.bottom + box.height - 8 / size[1], panel.title,
                 color=TEXT, fontsize=9, fontweight="bold", va="top")  # fmt: skip
        r = plot_rect(box, size, len(series))
        ax = fig.add_axes((r.left, r.bottom, r.width, r.height), facecolor=PANEL)
        ax.set_title(panel.title, alpha=0)  # invisible: names the axes for lookups
        _draw_series(ax, series, step_s.get(i, 1.0))
        _style_axes(ax, panel.unit, start, end, max_ticks=max(3, panel.grid.w - 1))
        if series:
            ax.legend(
                loc="upper left",
                bbox_to_anchor=(0.0, -AXIS_PX / (r.height * size[1])),
                ncols=LEGEND_COLUMNS,
                frameon=False,
                fontsize=7,
                labelcolor=TEXT,
                borderaxespad=0.0,
                handlelength=1.2,
                columnspacing=1.0,
                labelspacing=0.2,
            )
    return fig


def _style_axes(ax: Axes, unit: str, start: datetime, end: datetime, max_ticks: int) -> None:
    ax.set_xlim(start, end)  # type: ignore[arg-type]
    ax.set_ylim(bottom=0)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: format_value(unit, v)))
    span_s = (end - start).total_seconds()
    tick_s = next((t for t in TICKS_S if span_s / t <= max_ticks), TICKS_S[-1])
    ax.xaxis.set_major_locator(MultipleLocator(tick_s / 86_400))  # date units are days
    fmt = "%H:%M" if tick_s % 60 == 0 else "%H:%M:%S"
    ax.xaxis.set_major_formatter(mdates.DateFormatter(fmt, tz=UTC))  # type: ignore[no-untyped-call]
    ax.tick_params(colors=TEXT, labelsize=7, length=0)
    ax.grid(color=GRID, linewidth=0.5)
    for spine in ax.spines.values():
        spine.set_visible(False)


def panel_axes(fig: Figure) -> dict[str, Axes]:
    """The plotting axes of a drawn dashboard, by panel title."""
    return {ax.get_title(): ax for ax in fig.axes}


def grid_of(dashboard: Dashboard, title: str) -> GridPos:
    return next(p.grid for p in dashboard.panels if p.title == title)


def save_png(fig: Figure, path: Path) -> int:
    """Write `fig` as a palette PNG (`PNG_COLORS` colours); returns its size in bytes."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi, facecolor=fig.get_facecolor())
    buf.seek(0)
    with Image.open(buf) as img:
        img.convert("RGB").quantize(PNG_COLORS).save(path, optimize=True)
    return path.stat().st_size
