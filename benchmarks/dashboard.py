"""The Grafana dashboard (deploy/grafana/pdserve.json) against a real run, evaluated by
a real Prometheus and drawn in the dashboard's layout.

    python -m benchmarks.dashboard                    # about 6 min
        [--duration-s 180] [--rate 0.3] [--scrape-interval-s 2] [--out PNG] [--tiny]

1. Start a local cluster with `pdserve up`'s launcher: 2 router replicas, 1 prefill
   and 2 decode replicas of SmolLM2-135M-Instruct, each process reporting its
   metrics to the node's Ray metrics export every second.
2. Start `prometheus` on loopback (`benchmarks.prometheus`; its TSDB in a temporary
   directory) scraping that export, the endpoint README's observability section says
   to scrape, every `--scrape-interval-s`.
3. Send a bounded, open-loop, streamed load of short and long prompts over gRPC and
   HTTP for `--duration-s` (`benchmarks.dashboard_load`), and wait until the cluster
   is idle and Prometheus holds the last reports.
4. Evaluate every target of every panel with `/api/v1/query_range` over the run's time
   range, with the dashboard's variables and Grafana's `$__rate_interval` and
   `$__interval` substituted as Grafana does (`benchmarks.dashboard_panels`), and
   print a table of each panel's series.
5. If a panel has no data (no series with a value: a query or an exporter is wrong),
   fail (exit 1) naming it. Otherwise draw the panels in the dashboard's grid, with
   its titles, units and legends (`benchmarks.dashboard_render`), to `--out`.

Prometheus, the load and the cluster are stopped on every exit. Without a `prometheus`
binary the benchmark stops at once and says how to install one.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import secrets
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from benchmarks.dashboard_load import LoadResult, drive, plan
from benchmarks.dashboard_panels import Dashboard, QueryContext, legend, promql
from benchmarks.dashboard_render import Series, draw, save_png
from benchmarks.prometheus import PrometheusError, PrometheusServer, find_prometheus
from benchmarks.serving import free_port
from benchmarks.serving_driver import wait_idle, warm_up
from cluster.client import AsyncClient
from cluster.config import ClusterConfig
from cluster.config_file import load_config
from cluster.launcher import Launcher

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "pdserve.json"
OUT = Path(__file__).parent / "figures" / "dashboard.png"
MAX_MODEL_LEN = 1024
REPORT_INTERVAL_S = 1.0


def cluster_config(model_dir: str, token: str) -> ClusterConfig:
    return load_config(
        None,
        [
            "name=bench-dashboard",
            f"model.source={model_dir}",
            f"model.max_model_len={MAX_MODEL_LEN}",
            f"server.grpc_port={free_port()}",
            f"server.http_port={free_port()}",
            f"server.grpc_bearer_token={token}",  # Serve's gRPC proxy listens widely
            "router.replicas=2",
            "pools.prefill.replicas=1",
            "pools.decode.replicas=2",
            "pools.prefill.engine.kv_cache_bytes=128MiB",
            "pools.decode.engine.kv_cache_bytes=128MiB",
            f"ray.metrics_export_port={free_port()}",
            f"ray.metrics_report_interval_s={REPORT_INTERVAL_S}",
        ],
    )


@dataclass(frozen=True)
class TargetResult:
    ref: str
    query: str
    series: list[Series]

    @property
    def with_values(self) -> int:
        return sum(any(math.isfinite(v) for v in s.values) for s in self.series)


def evaluate(
    prom: PrometheusServer, dash: Dashboard, start: float, end: float
) -> tuple[dict[int, list[TargetResult]], dict[int, float]]:
    """Every target of every panel over [start, end], as Grafana would ask for it."""
    results: dict[int, list[TargetResult]] = {}
    steps: dict[int, float] = {}
    for i, panel in enumerate(dash.panels):
        ctx = QueryContext.for_panel(panel, start, end, prom.scrape_interval_s)
        lo, hi = ctx.aligned()
        steps[i] = ctx.step_s
        results[i] = []
        for t in panel.targets:
            query = promql(t.expr, dash, ctx)
            matrix = prom.query_range(query, lo, hi, ctx.step_s)
            series = [Series(legend(t, m.labels), m.times, m.values) for m in matrix]
            results[i].append(TargetResult(t.ref, query, sorted(series, key=lambda s: s.name)))
    return results, steps


def table(dash: Dashboard, results: dict[int, list[TargetResult]]) -> tuple[list[str], list[str]]:
    """The per-panel table (series with values / series returned, per target), and
    the panels without data."""
    lines = [f"{'panel':<34} {'unit':<12} {'series':>6}  per target (with values/returned)"]
    empty = []
    for i, panel in enumerate(dash.panels):
        rs = results[i]
        total = sum(r.with_values for r in rs)
        per = "  ".join(f"{r.ref}:{r.with_values}/{len(r.series)}" for r in rs)
        lines.append(f"{panel.title:<34} {panel.unit:<12} {total:>6}  {per}")
        if total == 0:
            empty.append(panel.title)
    return lines, empty


async def _load(launcher: Launcher, token: str, args: argparse.Namespace, vocab: int) -> LoadResult:
    n = max(2, round(args.rate * args.duration_s))
    planned, offsets = plan(n, args.rate, vocab, MAX_MODEL_LEN, args.seed)
    async with AsyncClient(
        launcher.grpc_target, token=token, timeout_s=args.request_timeout_s
    ) as c:
        await warm_up(c, [p.request for p in planned[:3]], args.request_timeout_s)
        print(
            f"load: {n} requests at {args.rate:g} req/s over about {args.duration_s:g} s",
            flush=True,
        )
        result = await drive(
            c,
            launcher.config.server.http_port,
            planned,
            offsets,
            request_timeout_s=args.request_timeout_s,
            deadline_s=args.drain_s,
        )
        if not await wait_idle(c, 120.0):
            print("warning: the cluster was not idle 120 s after the load", flush=True)
    return result


def run(args: argparse.Namespace, model_dir: str, tmp: Path) -> int:
    """Cluster, Prometheus and load; then every panel's queries, the table and the
    figure. 0: written; 1: a panel has no data."""
    from engine.config import ModelConfig

    dash = Dashboard.load(args.dashboard)
    token = f"bench-{secrets.token_hex(16)}"
    launcher = Launcher(
        cluster_config(model_dir, token), echo=lambda m: print(f"  {m}", flush=True)
    )
    try:
        state = launcher.start(timeout_s=args.start_timeout_s)
        print(f"metrics export: {state.metrics_urls}", flush=True)
        with PrometheusServer(list(state.metrics_urls), tmp, args.scrape_interval_s) as prom:
            prom.wait_scraping(60.0)
            start = time.time()
            print(f"prometheus {prom.binary} on {prom.url}", flush=True)
            vocab = ModelConfig.from_dir(model_dir).vocab_size
            load = asyncio.run(_load(launcher, token, args, vocab))
            print("requests:\n" + "\n".join(load.summary()), flush=True)
            # the last reports reach the export, then a scrape
            time.sleep(2 * (REPORT_INTERVAL_S + args.scrape_interval_s))
            end = time.time()
            results, steps = evaluate(prom, dash, start, end)
            version = prom.version()
    finally:
        launcher.stop()
    lines, empty = table(dash, results)
    print("\n" + "\n".join(lines), flush=True)
    failures = load.failures()
    if failures:
        print(f"{len(failures)} requests failed, e.g. {failures[:3]}", flush=True)
    if empty:
        print(f"\nFAILED: no data in panel(s) {empty}: a query or an exporter is wrong", flush=True)
        return 1
    fig = draw(dash, {i: [s for r in rs for s in r.series] for i, rs in results.items()},
               (start, end), steps, _title(dash, args, version, (start, end), load))  # fmt: skip
    args.out.parent.mkdir(parents=True, exist_ok=True)
    size = save_png(fig, args.out)
    print(f"\nwrote {args.out} ({size // 1024} KiB)", flush=True)
    return 0


def _title(
    dash: Dashboard,
    args: argparse.Namespace,
    version: str,
    window: tuple[float, float],
    load: LoadResult,
) -> str:
    day, a, b = (datetime.fromtimestamp(t, UTC).strftime(f) for t, f in
                 ((window[0], "%Y-%m-%d"), (window[0], "%H:%M"), (window[1], "%H:%M")))  # fmt: skip
    model = "a random tiny model" if args.tiny else args.model
    path = args.dashboard.resolve()
    name = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
    return (
        f"{dash.title}: the panels of {name}, their queries evaluated by "
        f"Prometheus {version} against a real run and drawn by benchmarks.dashboard "
        f"(not a Grafana screenshot)\n{day} {a}-{b} UTC: 2 router replicas, 1 prefill + 2 "
        f"decode replicas of {model} on CPU; {len(load.grpc) + len(load.http)} streamed "
        f"requests (after 3 to warm up), short and long prompts, over gRPC and HTTP at "
        f"{args.rate:g} req/s"
    )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.dashboard",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", default="smollm2-135m-instruct")
    p.add_argument("--tiny", action="store_true", help="a random 4-layer model (smoke run)")
    p.add_argument("--duration-s", type=float, default=180.0, help="how long arrivals last")
    p.add_argument("--rate", type=float, default=0.3, help="requests per second")
    p.add_argument("--scrape-interval-s", type=float, default=2.0)
    p.add_argument("--request-timeout-s", type=float, default=120.0)
    p.add_argument("--drain-s", type=float, default=150.0, help="after the last arrival")
    p.add_argument("--start-timeout-s", type=float, default=600.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dashboard", type=Path, default=DASHBOARD)
    p.add_argument("--out", type=Path, default=OUT)
    args = p.parse_args(argv)
    if not (0 < args.rate <= 10 and 10 <= args.duration_s <= 1800):
        p.error("--rate must be in (0, 10] and --duration-s in [10, 1800]")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    try:
        find_prometheus()
    except PrometheusError as e:
        print(f"benchmarks.dashboard: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="pdserve-dashboard-") as tmp:
        if args.tiny:
            from benchmarks.router_overhead import tiny_model

            model_dir = str(tiny_model(Path(tmp) / "model"))
        else:
            from engine.model_source import resolve_model

            model_dir = str(resolve_model(args.model))
        return run(args, model_dir, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
