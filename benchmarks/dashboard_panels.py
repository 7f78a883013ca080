"""The Grafana dashboard's panels as data, and its queries as Grafana sends them.

`Dashboard.load(path)` reads deploy/grafana/pdserve.json into `Panel`s (title, unit,
grid position, and each target's expression and legend format) and `Row`s. Nothing
here knows the dashboard's content: a panel added to the JSON is queried and drawn
like the others, and a feature of the JSON that this module cannot reproduce (a
template variable kind, an unknown macro, a panel type) is an error, not a guess.

`QueryContext` does what Grafana's Prometheus data source does before it calls
`/api/v1/query_range`:

* `$__interval`: the time range over the panel's width in pixels (its max data
  points), rounded to Grafana's steps (`round_interval_ms`), and at least the data
  source's scrape interval; it is also the query's step, and the range is aligned
  to it;
* `$__rate_interval`: max(`$__interval` + scrape interval, 4 x scrape interval);
* `$__range` (and `_s`, `_ms`), `$__interval_ms`;
* the dashboard's template variables (`$name`, `${name}`, `[[name]]`): constant,
  custom and textbox variables by their current value.

`grid_rects` maps each panel's `gridPos` (24 columns; rows of 30 px) to a rectangle
in figure coordinates, as the renderer draws it.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

GRID_COLUMNS = 24
GRID_ROW_PX = 30  # Grafana's grid cell height
DASHBOARD_WIDTH_PX = 1600  # the width a panel's max data points are computed for

# Grafana's interval rounding: an interval below the first bound rounds to the second.
_ROUND_MS: tuple[tuple[float, int], ...] = (
    (15, 10),
    (35, 20),
    (75, 50),
    (150, 100),
    (350, 200),
    (750, 500),
    (1_500, 1_000),
    (3_500, 2_000),
    (7_500, 5_000),
    (12_500, 10_000),
    (17_500, 15_000),
    (25_000, 20_000),
    (45_000, 30_000),
    (90_000, 60_000),
    (210_000, 120_000),
    (450_000, 300_000),
    (1_200_000, 600_000),
    (2_700_000, 1_800_000),
    (5_400_000, 3_600_000),
    (9_000_000, 7_200_000),
    (16_200_000, 10_800_000),
    (32_400_000, 21_600_000),
    (86_400_000, 43_200_000),
)
_VARIABLE = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)\]\]|\$(\w+)")
_LEGEND = re.compile(r"\{\{\s*(\w+)\s*\}\}")
_PLAIN_VARIABLES = ("constant", "custom", "textbox")


class DashboardError(ValueError):
    """The dashboard uses something this reproduction of Grafana does not support."""


@dataclass(frozen=True)
class GridPos:
    x: int
    y: int
    w: int
    h: int


@dataclass(frozen=True)
class Target:
    ref: str
    expr: str
    legend: str | None  # Grafana's legendFormat; None: the series' labels


@dataclass(frozen=True)
class Panel:
    title: str
    unit: str
    grid: GridPos
    targets: tuple[Target, ...]
    description: str = ""


@dataclass(frozen=True)
class Row:
    title: str
    grid: GridPos


@dataclass(frozen=True)
class Dashboard:
    title: str
    panels: tuple[Panel, ...]
    rows: tuple[Row, ...]
    variables: dict[str, str]  # plain template variables by name: their current value
    datasource_variables: frozenset[str]

    @classmethod
    def load(cls, path: Path) -> Dashboard:
        return cls.parse(json.loads(path.read_text()))

    @classmethod
    def parse(cls, doc: dict[str, Any]) -> Dashboard:
        panels, rows = [], []
        for raw in _flat_panels(doc.get("panels", [])):
            grid = GridPos(**{k: int(raw["gridPos"][k]) for k in ("x", "y", "w", "h")})
            if raw.get("type") == "row":
                rows.append(Row(str(raw.get("title", "")), grid))
            elif raw.get("type") == "timeseries":
                panels.append(_panel(raw, grid))
            else:
                raise DashboardError(f"panel {raw.get('title')!r}: type {raw.get('type')!r}")
        plain, sources = {}, set()
        for var in doc.get("templating", {}).get("list", []):
            if var.get("type") == "datasource":
                sources.add(var["name"])
            elif var.get("type") in _PLAIN_VARIABLES:
                plain[var["name"]] = str(var.get("current", {}).get("value", var.get("query")))
            else:
                raise DashboardError(f"template variable {var.get('name')!r}: {var.get('type')}")
        return cls(str(doc.get("title", "")), tuple(panels), tuple(rows), plain, frozenset(sources))


def _flat_panels(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Top-level panels, with those of a collapsed row after the row."""
    out = []
    for p in panels:
        out.append(p)
        out.extend(p.get("panels", []) if p.get("type") == "row" else [])
    return out


def _panel(raw: dict[str, Any], grid: GridPos) -> Panel:
    title = str(raw.get("title", ""))
    targets = []
    for t in raw.get("targets", []):
        if t.get("hide"):
            continue
        if not isinstance(t.get("expr"), str):
            raise DashboardError(f"panel {title!r}: target {t.get('refId')} has no expr")
        legend = t.get("legendFormat")
        legend = None if legend in (None, "", "__auto") else str(legend)
        targets.append(Target(str(t.get("refId", "")), t["expr"], legend))
    if not targets:
        raise DashboardError(f"panel {title!r} has no query")
    unit = str(raw.get("fieldConfig", {}).get("defaults", {}).get("unit", "short"))
    return Panel(title, unit, grid, tuple(targets), str(raw.get("description", "")))


def round_interval_ms(ms: float) -> int:
    for bound, rounded in _ROUND_MS:
        if ms < bound:
            return rounded
    return 86_400_000 if ms < 604_800_000 else 604_800_000  # a day, or a week


def format_duration(ms: int) -> str:
    """A Prometheus duration in the largest whole unit (Grafana's interval text)."""
    for unit, size in (("d", 86_400_000), ("h", 3_600_000), ("m", 60_000), ("s", 1000)):
        if ms >= size and ms % size == 0:
            return f"{ms // size}{unit}"
    return f"{ms}ms"


@dataclass(frozen=True)
class QueryContext:
    """One query_range call's time range, as Grafana derives it for a panel."""

    start_s: float
    end_s: float
    scrape_interval_s: float  # the Prometheus data source's "Scrape interval"
    width_px: int  # the panel's width: its max data points

    @classmethod
    def for_panel(
        cls, panel: Panel, start_s: float, end_s: float, scrape_interval_s: float
    ) -> QueryContext:
        width = round(panel.grid.w * DASHBOARD_WIDTH_PX / GRID_COLUMNS)
        return cls(start_s, end_s, scrape_interval_s, width)

    @property
    def interval_ms(self) -> int:
        span_ms = (self.end_s - self.start_s) * 1000
        return max(round(self.scrape_interval_s * 1000), round_interval_ms(span_ms / self.width_px))

    @property
    def rate_interval_ms(self) -> int:
        scrape_ms = round(self.scrape_interval_s * 1000)
        return max(self.interval_ms + scrape_ms, 4 * scrape_ms)

    @property
    def step_s(self) -> float:
        return self.interval_ms / 1000

    def aligned(self) -> tuple[float, float]:
        """The range Grafana asks for: start and end floored to the step."""
        step = self.step_s
        return (self.start_s // step) * step, (self.end_s // step) * step

    def macros(self) -> dict[str, str]:
        range_ms = round((self.end_s - self.start_s) * 1000)
        return {
            "__rate_interval": format_duration(self.rate_interval_ms),
            "__interval": format_duration(self.interval_ms),
            "__interval_ms": str(self.interval_ms),
            "__range": f"{range_ms // 1000}s",
            "__range_s": str(range_ms // 1000),
            "__range_ms": str(range_ms),
        }


def promql(expr: str, dashboard: Dashboard, ctx: QueryContext) -> str:
    """`expr` with the dashboard's variables and Grafana's macros substituted."""
    values = {**dashboard.variables, **ctx.macros()}

    def sub(m: re.Match[str]) -> str:
        name = m.group(1) or m.group(2) or m.group(3)
        if name in values:
            return values[name]
        raise DashboardError(f"query {expr!r}: unknown variable ${name}")

    return _VARIABLE.sub(sub, expr)


def legend(target: Target, labels: dict[str, str]) -> str:
    """A series' name in the legend: `legendFormat` with `{{label}}` filled in (an
    absent label is empty, as in Grafana), or the series' labels."""
    if target.legend is None:
        name = labels.get("__name__", "")
        inner = ", ".join(f'{k}="{v}"' for k, v in sorted(labels.items()) if k != "__name__")
        return f"{name}{{{inner}}}" if inner or not name else name
    return " ".join(_LEGEND.sub(lambda m: labels.get(m.group(1), ""), target.legend).split())


@dataclass(frozen=True)
class Rect:
    """A panel's place in figure coordinates (0..1, origin at the bottom left)."""

    left: float
    bottom: float
    width: float
    height: float


def grid_height(dashboard: Dashboard) -> int:
    """The dashboard's height in grid rows."""
    grids = [p.grid for p in dashboard.panels] + [r.grid for r in dashboard.rows]
    return max((g.y + g.h for g in grids), default=0)


def grid_rect(grid: GridPos, total_rows: int) -> Rect:
    """Where a `gridPos` lies in a figure that holds `total_rows` grid rows."""
    if not (grid.x >= 0 and grid.w > 0 and grid.x + grid.w <= GRID_COLUMNS):
        raise DashboardError(f"gridPos {grid}: outside the {GRID_COLUMNS} columns")
    top = 1.0 - grid.y / total_rows
    height = grid.h / total_rows
    return Rect(grid.x / GRID_COLUMNS, top - height, grid.w / GRID_COLUMNS, height)
