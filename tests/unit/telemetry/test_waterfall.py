"""The waterfall view of one trace, and span records' JSON round trip."""

from __future__ import annotations

import pytest

from telemetry.records import SpanRecord
from telemetry.waterfall import render, tree_order

MS = 1_000_000
T = "ab" * 16


def _span(
    sid: str, parent: str, name: str, start_ms: float, end_ms: float, **attrs: int
) -> SpanRecord:
    return SpanRecord(
        T, sid * 16, parent * 16 if parent else "", name, "svc", int(start_ms * MS),
        int(end_ms * MS), dict(attrs),
    )  # fmt: skip


SPANS = [
    _span("3", "1", "route", 2, 3),
    _span("1", "", "request", 0, 40),
    _span("4", "1", "dispatch", 3, 40),
    _span("2", "1", "validate", 0, 1),
    _span("5", "4", "prefill.layer", 5, 10, layer=0),
    _span("6", "4", "kv.send", 10, 20, layer=0),
    _span("7", "9", "orphan", 30, 35),  # its parent is not in the set
]


def test_tree_order_puts_children_under_parents_by_start() -> None:
    order = [(d, s.name) for d, s in tree_order(SPANS)]
    assert order == [
        (0, "request"),
        (1, "validate"),
        (1, "route"),
        (1, "dispatch"),
        (2, "prefill.layer"),
        (2, "kv.send"),
        (0, "orphan"),
    ]


def test_render_draws_bars_on_one_time_axis() -> None:
    text = render(SPANS, width=40)
    lines = text.splitlines()
    assert lines[0] == f"trace {T}: 7 spans, 40.0 ms"
    rows = {line.split("|")[0].split("svc")[1].strip(): line for line in lines[2:]}
    assert set(rows) == {
        "request", "validate", "route", "dispatch", "prefill.layer layer=0", "kv.send layer=0",
        "orphan",
    }  # fmt: skip

    def bar(name: str) -> str:
        return rows[name].split("|")[1]

    assert bar("request") == "#" * 40
    assert bar("validate") == "#" + " " * 39
    # the send starts where the layer ends: 10 ms of 40 is column 10
    assert bar("kv.send layer=0").index("#") == 10 and bar("kv.send layer=0").count("#") == 10
    assert (
        bar("prefill.layer layer=0").rstrip().endswith("#")
        and bar("prefill.layer layer=0").index("#") == 5
    )
    assert "  validate" in rows["validate"] and "    kv.send" in rows["kv.send layer=0"]
    assert rows["route"].startswith("    2.0 ms     1.0 ms")


def test_render_marks_errors_and_handles_empty_input() -> None:
    failed = SpanRecord(T, "1" * 16, "", "request", "router", 0, MS, error="bad")
    assert render([failed]).endswith("| !")
    assert render([]) == ""
    with pytest.raises(ValueError):
        render([failed], width=0)


def test_span_records_round_trip_through_json() -> None:
    rec = _span("5", "4", "prefill.layer", 5, 10, layer=3)
    assert SpanRecord.from_json(rec.to_json()) == rec
    for bad in ("[]", '{"trace_id": 1}', '{"trace_id": "a", "span_id": "b", "parent_id": ""}'):
        with pytest.raises(ValueError):
            SpanRecord.from_json(bad)
