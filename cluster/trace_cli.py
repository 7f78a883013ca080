"""`pdserve trace`: one request's spans from the cluster's trace store, as a waterfall.

    pdserve trace REQUEST_ID [--name N] [--width 40] [--json]
    pdserve trace                       the most recent traced requests

The store is the cluster's Redis (`registry.traces`), found in the run state of the
cluster started by `pdserve up --name N`, or given by $PDSERVE_REDIS_URL (a URL with
credentials stays out of argv). With `tracing.otlp_endpoint` set, spans go to the
collector instead and the store stays empty.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from typing import Any

from cluster.run_state import RunState, run_dir_for
from registry import connect
from registry.traces import TraceStore
from telemetry.records import SpanRecord
from telemetry.waterfall import render

REDIS_URL_ENV = "PDSERVE_REDIS_URL"


def _redis_url(name: str) -> str | None:
    if os.environ.get(REDIS_URL_ENV):
        return os.environ[REDIS_URL_ENV]
    state = RunState.read(run_dir_for(name))
    return state.redis_url if state is not None else None


def request_spans(redis_url: str, cluster: str, request_id: str) -> list[SpanRecord]:
    """The stored spans of one request (by request id or trace id)."""
    client = connect(redis_url)
    try:
        return TraceStore(client, cluster).spans(request_id)
    finally:
        client.close()


def show(redis_url: str, cluster: str, request_id: str, width: int = 40) -> str:
    """The waterfall of one request, or a line saying there is none."""
    spans = request_spans(redis_url, cluster, request_id)
    if not spans:
        return f"no spans stored for {request_id!r} (not traced, evicted, or still running)"
    return f"request {request_id}\n" + render(spans, width)


def cmd_trace(args: argparse.Namespace) -> int:
    url = _redis_url(args.name)
    if url is None:
        print(
            f"pdserve trace: no running cluster named {args.name!r}; set ${REDIS_URL_ENV}",
            file=sys.stderr,
        )
        return 1
    if not args.request_id:
        client = connect(url)
        try:
            for rid, tid in TraceStore(client, args.name).recent(args.last):
                print(f"{rid}  trace {tid}")
        finally:
            client.close()
        return 0
    if args.json:
        spans = request_spans(url, args.name, args.request_id)
        out: list[dict[str, Any]] = [asdict(s) for s in spans]
        print(json.dumps(out, indent=2))
        return 0 if spans else 1
    text = show(url, args.name, args.request_id, args.width)
    print(text)
    return 0 if not text.startswith("no spans") else 1


def add_parsers(sub: Any) -> None:
    p = sub.add_parser("trace", help="a request's spans as a waterfall")
    p.add_argument("request_id", nargs="?", help="request id or trace id; none: list recent")
    p.add_argument("--name", default="pdserve", help="the cluster's name")
    p.add_argument("--width", type=int, default=40, help="width of the time axis")
    p.add_argument("--last", type=int, default=20, help="recent requests to list")
    p.add_argument("--json", action="store_true", help="the spans as JSON")
    p.set_defaults(func=cmd_trace)
