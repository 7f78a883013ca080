"""`pdserve status`: the cluster's pools and instances, and its key figures live.

    pdserve status [--name N | --target HOST:PORT] [--json]
                   [--metrics-url URL ...] [--watch SECONDS [--count N]]

The pools and each instance's load come from the router's ClusterStatus call. The
figures (requests, TTFT/TPOT/E2E percentiles, goodput, queues, KV use, prefix hits,
step time, KV-transfer bandwidth) come from one scrape of each Ray node's metrics
export: the URLs `pdserve up` recorded in the run state, or `--metrics-url`. With
`--watch` the screen refreshes every SECONDS, the figures covering the interval since
the previous refresh, until Ctrl-C (or `--count` refreshes).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

from cluster.client import Client, ClientError, ClusterState
from cluster.figures import Figures
from cluster.run_state import RunState, pid_alive, run_dir_for
from cluster.scrape import Samples, scrape

MIN_WATCH_S, MAX_WATCH_S = 0.5, 3600.0
_CLEAR = "\x1b[H\x1b[2J"


def _echo(msg: str) -> None:
    print(msg, flush=True)


def state_lines(state: ClusterState, healthy: bool) -> list[str]:
    out = [f"cluster {state.cluster}: {'SERVING' if healthy else 'NOT SERVING'}"]
    for p in state.pools:
        live = f"{len(p.instances)}/{p.replicas}"
        out.append(f"  pool {p.name} ({p.role}) {live} replicas, tp={p.tp} pp={p.pp}")
        for i in p.instances:
            if i.load is None:
                out.append(f"    {i.instance_id}: no load report yet")
                continue
            ld = i.load
            out.append(
                f"    {i.instance_id}: {ld.running_seqs} running, "
                f"{ld.queued_prefill_tokens} queued prefill tokens, "
                f"{ld.free_kv_blocks}/{ld.total_kv_blocks} free KV blocks "
                f"({ld.age_ms:.0f} ms ago)"
            )
    return out


def metrics_urls(args: argparse.Namespace) -> list[str]:
    if args.metrics_url:
        return list(args.metrics_url)
    state = RunState.read(run_dir_for(args.name))
    if state is not None and pid_alive(state.pid):
        return list(state.metrics_urls)
    return []


class Watcher:
    """One refresh: the cluster state and a scrape, with the previous scrape kept for
    the rates."""

    def __init__(self, client: Client, urls: list[str]) -> None:
        self._client, self._urls = client, urls
        self._last: tuple[Samples, float] | None = None

    def refresh(self) -> tuple[list[str], bool]:
        healthy = self._client.healthy()
        state = self._client.cluster_status()
        lines, ok = state_lines(state, healthy), healthy and state.ready
        if not self._urls:
            return [*lines, "metrics: no metrics export known (see --metrics-url)"], ok
        try:
            now_samples, now = scrape(self._urls), time.monotonic()
        except OSError as e:
            return [*lines, f"metrics: cannot scrape {', '.join(self._urls)}: {e}"], ok
        before, then = (None, None) if self._last is None else self._last
        span = None if then is None else now - then
        self._last = (now_samples, now)
        return [*lines, *Figures(now_samples, before, span).lines()], ok


def watch(
    refresh: Callable[[], tuple[list[str], bool]],
    interval_s: float,
    count: int | None,
    clear: bool,
    sleep: Callable[[float], None] = time.sleep,
) -> int:
    """Print `refresh()` every `interval_s` until Ctrl-C or `count` refreshes."""
    shown, ok = 0, True
    try:
        while count is None or shown < count:
            if shown:
                sleep(interval_s)
            lines, ok = refresh()
            stamp = time.strftime("%H:%M:%S")
            text = "\n".join([f"{stamp}  (every {interval_s:g} s; Ctrl-C stops)", *lines])
            _echo((_CLEAR if clear else "") + text)
            shown += 1
    except KeyboardInterrupt:
        return 0
    return 0 if ok else 1


def cmd_status(args: argparse.Namespace, target: str, token: str | None) -> int:
    if args.watch is not None and not MIN_WATCH_S <= args.watch <= MAX_WATCH_S:
        print(f"pdserve status: --watch must be in [{MIN_WATCH_S}, {MAX_WATCH_S}]", file=sys.stderr)
        return 2
    if args.count is not None and args.count < 1:
        print("pdserve status: --count must be >= 1", file=sys.stderr)
        return 2
    with Client(target, token=token) as c:
        try:
            if args.json:
                return _json(c)
            watcher = Watcher(c, metrics_urls(args))
            if args.watch is None:
                lines, ok = watcher.refresh()
                _echo("\n".join(lines))
                return 0 if ok else 1
            return watch(watcher.refresh, args.watch, args.count, sys.stdout.isatty())
        except ClientError as e:
            print(f"pdserve status: {e}", file=sys.stderr)
            return 1


def _json(c: Client) -> int:
    healthy = c.healthy()
    state = c.cluster_status()
    print(json.dumps({"healthy": healthy, **asdict(state)}, indent=2))
    return 0 if healthy and state.ready else 1


def add_status_args(p: Any) -> None:
    p.add_argument("--json", action="store_true", help="the pools and instances as JSON")
    p.add_argument(
        "--metrics-url",
        action="append",
        help="a Ray node's metrics export (default: those `pdserve up` recorded)",
    )
    p.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help=f"refresh every SECONDS ({MIN_WATCH_S} to {MAX_WATCH_S:g}) until Ctrl-C",
    )
    p.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
