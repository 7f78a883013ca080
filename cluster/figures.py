"""The key figures of a running cluster, from its metrics (cluster.scrape), as
`pdserve status` prints them.

`Figures(after, before, window_s)`: with a previous scrape, rates and latency
percentiles cover the window between the two (what happened in the last refresh);
without one, they cover everything since the processes started.
"""

from __future__ import annotations

from dataclasses import dataclass

from cluster.scrape import Samples, bucket_deltas, quantile

_EMPTY = Samples(())
_POOL_ROLES = ("prefill", "decode", "colocated")


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1000:.1f} ms"


def _rate(value: float, window_s: float | None) -> str:
    return f"{value:.0f}" if window_s is None else f"{value / window_s:.1f}/s"


@dataclass(frozen=True, order=True)
class Process:
    pool: str
    replica: str
    rank: str
    role: str


class Figures:
    def __init__(self, after: Samples, before: Samples | None, window_s: float | None) -> None:
        self.after = after
        self.before = before if before is not None else _EMPTY
        self.window_s = window_s if before is not None else None

    def delta(self, name: str, **match: str) -> float:
        return max(0.0, self.after.sum(name, **match) - self.before.sum(name, **match))

    def percentile(self, name: str, q: float, **match: str) -> float | None:
        return quantile(q, bucket_deltas(self.before, self.after, name, **match))

    def processes(self) -> list[Process]:
        return sorted(
            Process(s.labels["pool"], s.labels["replica"], s.labels["rank"], s.labels["role"])
            for s in self.after.get("pdserve_up")
            if s.value > 0
        )

    def lines(self) -> list[str]:
        procs = self.processes()
        if not procs:
            return ["metrics: no pdserve process reported yet"]
        routers = sum(p.role == "router" for p in procs)
        pools = [p for p in procs if p.role in _POOL_ROLES]
        span = "since start" if self.window_s is None else f"last {self.window_s:.1f} s"
        out = [f"metrics ({span}): {routers} router replicas, {len(pools)} pool processes"]
        out += self._router()
        out += [self._process(p) for p in pools]
        out += self._transfers()
        return out

    def _router(self) -> list[str]:
        w = self.window_s
        done = self.delta("pdserve_ttft_seconds_count")
        met = self.delta("pdserve_slo_requests_total", slo="met")
        goodput = f"{100 * met / done:.0f}%" if done else "-"
        return [
            f"  router: {_rate(done, w)} requests, "
            f"{self.after.sum('pdserve_inflight_requests'):.0f} in flight, "
            f"{self.delta('pdserve_admissions_total', outcome='refused'):.0f} refused, "
            f"{self.delta('pdserve_request_retries_total'):.0f} retries, "
            f"{self.delta('pdserve_stream_migrations_total'):.0f} migrations, "
            f"{self.delta('pdserve_remote_prefill_fallbacks_total'):.0f} fallbacks; "
            f"{_rate(self.delta('pdserve_completion_tokens_total'), w)} tokens out",
            f"    ttft p50 {_ms(self.percentile('pdserve_ttft_seconds', 0.5))} "
            f"p90 {_ms(self.percentile('pdserve_ttft_seconds', 0.9))}, "
            f"tpot p50 {_ms(self.percentile('pdserve_tpot_seconds', 0.5))}, "
            f"e2e p50 {_ms(self.percentile('pdserve_e2e_seconds', 0.5))}, "
            f"goodput {goodput} within SLO",
        ]

    def _process(self, p: Process) -> str:
        a = self.after
        match = {"pool": p.pool, "replica": p.replica, "rank": p.rank}
        head = f"  {p.pool} {p.replica} rank {p.rank}"
        if not a.get("pdserve_engine_kv_free_blocks", **match):
            return head + ": (no engine on this rank)"
        used = a.sum("pdserve_engine_kv_used_blocks", **match)
        total = used + a.sum("pdserve_engine_kv_free_blocks", **match)
        lookups = self.delta("pdserve_engine_prefix_cache_lookup_blocks_total", **match)
        hits = self.delta("pdserve_engine_prefix_cache_hit_blocks_total", **match)
        step = self.percentile("pdserve_engine_step_seconds", 0.5, **match)
        return (
            f"{head}: {a.sum('pdserve_engine_running_sequences', **match):.0f} running, "
            f"{a.sum('pdserve_engine_waiting_sequences', **match):.0f} waiting, "
            f"{a.sum('pdserve_engine_queued_prefill_tokens', **match):.0f} queued prompt "
            f"tokens, KV {used:.0f}/{total:.0f} blocks"
            f" ({100 * used / total if total else 0:.0f}%), prefix hits "
            f"{f'{100 * hits / lookups:.0f}%' if lookups else '-'}, step p50 "
            f"{_ms(step)}, "
            f"{self.delta('pdserve_engine_preemptions_total', **match):.0f} preemptions"
        )

    def _transfers(self) -> list[str]:
        out = []
        for role, verb in (("send", "sent"), ("recv", "received")):
            done = self.delta("pdserve_kv_transfers_completed_total", role=role)
            errors = self.delta("pdserve_kv_transfer_errors_total", role=role)
            nbytes = self.delta("pdserve_kv_transfer_bytes_total", role=role)
            if not (done or errors or nbytes):
                continue
            size = (
                f"{nbytes / 1e6:.1f} MB"
                if self.window_s is None
                else f"{nbytes / self.window_s / 1e9:.3f} GB/s"
            )
            p50 = self.percentile("pdserve_kv_transfer_duration_seconds", 0.5, role=role)
            out.append(
                f"  kv transfer {verb}: {done:.0f} done, {errors:.0f} failed, {size}, "
                f"duration p50 {_ms(p50)}"
            )
        return out
