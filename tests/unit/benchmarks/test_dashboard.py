"""The dashboard benchmark's reading of deploy/grafana/pdserve.json: every target becomes
a PromQL query with Grafana's macros and the dashboard's variables substituted as
Grafana does, and every panel is drawn where its gridPos puts it, with its title, its
unit and a legend entry per series. No cluster and no Prometheus: the figure is drawn
from series made up here."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from benchmarks.dashboard_panels import (
    Dashboard,
    DashboardError,
    GridPos,
    QueryContext,
    Target,
    grid_height,
    grid_rect,
    legend,
    promql,
    round_interval_ms,
)
from benchmarks.dashboard_render import (
    Series,
    draw,
    figure_size_px,
    format_value,
    panel_axes,
    plot_rect,
)

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve.json"
T0 = 1_800_000_000.0


def _doc() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _ctx(seconds: float, scrape_s: float = 2.0, width_px: int = 533) -> QueryContext:
    return QueryContext(T0, T0 + seconds, scrape_s, width_px)


def test_every_panel_and_target_of_the_json_is_read() -> None:
    doc, dash = _doc(), Dashboard.load(DASHBOARD)
    raw = [p for p in doc["panels"] if p["type"] != "row"]
    assert [p.title for p in dash.panels] == [p["title"] for p in raw]
    assert [r.title for r in dash.rows] == [p["title"] for p in doc["panels"] if p["type"] == "row"]
    for panel, p in zip(dash.panels, raw, strict=True):
        assert panel.unit == p["fieldConfig"]["defaults"]["unit"]
        assert panel.grid == GridPos(**p["gridPos"])
        assert [t.expr for t in panel.targets] == [t["expr"] for t in p["targets"]]
        assert [t.legend for t in panel.targets] == [t["legendFormat"] for t in p["targets"]]
        format_value(panel.unit, 1.0)  # every unit is one the renderer draws
    assert dash.datasource_variables == {"datasource"}


def test_grafana_intervals() -> None:
    # a few minutes over a third of the dashboard's width: the scrape interval bounds it
    ctx = _ctx(300)
    assert ctx.interval_ms == 2000 and ctx.rate_interval_ms == 8000
    assert ctx.macros()["__rate_interval"] == "8s" and ctx.step_s == 2.0
    # a day: 86400 s / 533 px = 162 s, rounded to Grafana's 2m
    day = _ctx(86_400, scrape_s=15.0)
    assert day.macros()["__interval"] == "2m" and day.macros()["__rate_interval"] == "135s"
    assert [round_interval_ms(x) for x in (9, 40, 1200, 3000, 20_000, 100_000)] == [
        10, 50, 1000, 2000, 20_000, 120_000,
    ]  # fmt: skip
    lo, hi = _ctx(301.3).aligned()
    assert lo % 2 == 0 and hi % 2 == 0 and lo <= T0 and hi <= T0 + 301.3 < hi + 2


def test_every_query_becomes_promql_without_a_variable_left() -> None:
    dash = Dashboard.load(DASHBOARD)
    ctx = _ctx(300)
    for panel in dash.panels:
        for t in panel.targets:
            q = promql(t.expr, dash, ctx)
            assert "$" not in q and "[[" not in q, q
            # every range selector is the rate interval
            for window in re.findall(r"\[([^\]]+)\]", q):
                assert window == "8s", q
            assert q == t.expr.replace("$__rate_interval", "8s")


def test_variables_and_unknown_ones() -> None:
    doc = {
        "panels": [],
        "templating": {
            "list": [{"name": "pool", "type": "custom", "current": {"value": "decode"}}]
        },
    }
    dash = Dashboard.parse(doc)
    ctx = _ctx(60)
    assert promql('x{pool="$pool"}[$__range]', dash, ctx) == 'x{pool="decode"}[60s]'
    assert promql('x{pool="${pool}",a="[[pool]]"}', dash, ctx) == 'x{pool="decode",a="decode"}'
    with pytest.raises(DashboardError, match=r"\$cluster"):
        promql('x{c="$cluster"}', dash, ctx)
    with pytest.raises(DashboardError, match="query"):
        Dashboard.parse({"templating": {"list": [{"name": "q", "type": "query"}]}})


def test_legends_fill_labels_as_grafana_does() -> None:
    t = Target("A", "x", "p50 {{path}}")
    assert legend(t, {"path": "disaggregated"}) == "p50 disaggregated"
    assert legend(t, {}) == "p50"  # an absent label is empty
    assert legend(Target("A", "x", None), {"__name__": "up", "job": "ray"}) == 'up{job="ray"}'


def test_units() -> None:
    assert format_value("s", 0.0005) == "500 µs" and format_value("s", 0.25) == "250 ms"
    assert format_value("percentunit", 0.5) == "50%"
    assert format_value("Bps", 2.5e9) == "2.5 GB/s"
    assert format_value("reqps", 0.3) == "0.3 req/s"
    with pytest.raises(DashboardError, match="unit 'furlongs'"):
        format_value("furlongs", 1.0)


def test_the_grid_layout_follows_gridpos() -> None:
    dash = Dashboard.load(DASHBOARD)
    rows = grid_height(dash)
    rects = [grid_rect(p.grid, rows) for p in dash.panels]
    for p, r in zip(dash.panels, rects, strict=True):
        assert math.isclose(r.left, p.grid.x / 24) and math.isclose(r.width, p.grid.w / 24)
        assert math.isclose(r.bottom + r.height, 1 - p.grid.y / rows)
    for i, a in enumerate(rects):  # no two panels overlap
        for b in rects[i + 1 :]:
            apart_x = a.left + a.width <= b.left + 1e-9 or b.left + b.width <= a.left + 1e-9
            apart_y = (
                a.bottom + a.height <= b.bottom + 1e-9 or b.bottom + b.height <= a.bottom + 1e-9
            )
            assert apart_x or apart_y, (a, b)
    with pytest.raises(DashboardError, match="columns"):
        grid_rect(GridPos(20, 0, 8, 8), rows)


def test_every_panel_is_drawn_in_its_place_with_its_legend() -> None:
    dash = Dashboard.load(DASHBOARD)
    times = [T0 + 2 * i for i in range(60)]
    data = {
        i: [
            Series(f"{p.title} {t.ref}", times, [float(k % 7) for k in range(60)])
            for t in p.targets
        ]
        for i, p in enumerate(dash.panels)
    }
    fig = draw(dash, data, (T0, times[-1]), {i: 2.0 for i in data}, "test")
    axes = panel_axes(fig)
    assert set(axes) == {p.title for p in dash.panels}
    size = figure_size_px(dash)
    assert (round(fig.get_figwidth() * fig.dpi), round(fig.get_figheight() * fig.dpi)) == size
    for i, panel in enumerate(dash.panels):
        ax = axes[panel.title]
        box = ax.get_position()
        grid = grid_rect(panel.grid, grid_height(dash))
        # inside the panel's column span, and ordered as the grid's rows and columns are
        assert grid.left <= box.x0 < box.x1 <= grid.left + grid.width
        entries = [t.get_text() for t in ax.get_legend().get_texts()]
        assert entries == [s.name for s in data[i]]
        assert len(ax.get_lines()) == len(panel.targets)
        label = ax.yaxis.get_major_formatter()(1.0, 0)
        assert label == format_value(panel.unit, 1.0)
    left_col = [axes[p.title].get_position() for p in dash.panels if p.grid.x == 0]
    assert [b.y0 for b in left_col] == sorted((b.y0 for b in left_col), reverse=True)
    r = plot_rect(grid_rect(dash.panels[0].grid, grid_height(dash)), size, 6)
    assert r.height > 0.02  # a panel with six legend entries keeps room to plot


def test_without_prometheus_the_benchmark_says_how_to_install_it(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from benchmarks.dashboard import main

    monkeypatch.setenv("PATH", str(tmp_path))  # no prometheus here
    assert main([]) == 2
    assert "apt-get install -y prometheus" in capsys.readouterr().err
