"""The Grafana dashboard in deploy/grafana: every query names metrics that the code
defines, as Ray's metrics export shows them, and the panels cover what an operator
needs. The names come from the code's own definitions: every module of the project
that defines a `MetricDef` is imported, and each definition registers itself."""

from __future__ import annotations

import importlib
import json
import re
from pathlib import Path
from typing import Any

from worker.metric_set import DEFINED, RAY_PREFIX

ROOT = Path(__file__).resolve().parents[3]
DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve.json"
PACKAGES = ("engine", "kv_transfer", "registry", "worker", "prefill_worker", "decode_worker")
PACKAGES += ("router", "cluster")
_NAME = re.compile(r"\b[a-z_]*pdserve_[a-z0-9_]+")
# PromQL words that look like names but are not series
_FUNCTIONS = {"histogram_quantile", "rate", "sum", "by", "le"}


def _exported() -> set[str]:
    """Every sample name the code exports through Ray, from its definitions."""
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "MetricDef(" in path.read_text():
                rel = path.relative_to(ROOT).with_suffix("")
                importlib.import_module(".".join(rel.parts).removesuffix(".__init__"))
    return {n for d in DEFINED.values() for n in d.exported_names(RAY_PREFIX)}


def _queries(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        return found + [q for v in node.values() for q in _queries(v)]
    if isinstance(node, list):
        return [q for v in node for q in _queries(v)]
    return []


def test_every_query_names_metrics_the_code_exports() -> None:
    exported = _exported()
    # the definitions were found (engine, transfer and router metrics at least)
    assert {"ray_pdserve_ttft_seconds_bucket", "ray_pdserve_engine_kv_free_blocks"} <= exported
    assert "ray_pdserve_kv_transfer_bytes_total" in exported
    queries = _queries(json.loads(DASHBOARD.read_text()))
    assert len(queries) >= 20
    unknown = {
        (name, q)
        for q in queries
        for name in _NAME.findall(q)
        if name not in _FUNCTIONS and name not in exported
    }
    assert not unknown, f"queries name metrics the code does not export: {sorted(unknown)}"
    assert all(_NAME.search(q) for q in queries), "a query names no pdserve metric"


def test_the_panels_cover_latency_goodput_pools_transfer_and_failures() -> None:
    dash = json.loads(DASHBOARD.read_text())
    panels = [p for p in dash["panels"] if p["type"] != "row"]
    text = " ".join(p["title"] + " " + " ".join(_queries(p)) for p in panels)
    for needle in (
        "ray_pdserve_ttft_seconds_bucket",
        "ray_pdserve_tpot_seconds_bucket",
        "ray_pdserve_e2e_seconds_bucket",
        "ray_pdserve_slo_requests_total",
        "ray_pdserve_engine_waiting_sequences",
        "ray_pdserve_engine_kv_used_blocks",
        "ray_pdserve_kv_transfer_bytes_total",
        "ray_pdserve_remote_prefill_fallbacks_total",
        "ray_pdserve_stream_migrations_total",
    ):
        assert needle in text, needle
    for q in _queries(dash):  # quantiles are taken over rates of buckets, by le
        if "histogram_quantile" in q:
            assert "_bucket[" in q and "by (le" in q, q
    ids = [p["gridPos"] for p in dash["panels"]]
    assert len({(g["x"], g["y"]) for g in ids}) == len(ids), "panels overlap"
