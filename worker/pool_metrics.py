"""The pools' metrics: the engine (rank 0 of each replica) and KV transfer (each rank).

Every pool process records into a `MetricSet` labelled with its pool, replica and rank,
so the node's Ray metrics export shows each replica and rank actor apart.

    EngineMetrics   on the engine thread: `stepped(seconds, tokens)` after each step
                    (two histogram records), and `sample(engine)` at most every
                    `sample_interval_s`: queue, batch and KV gauges, and the engine's
                    cumulative prefix-cache and preemption counts as increments
    TransferMetrics `record(TransferRecord)`, the kv_transfer roles' `on_record`: bytes,
                    blocks, duration and effective bandwidth of each transfer, or its
                    failure by kind; `recomputed(blocks, reason)` on the decode side
                    when a remote prefill falls back to computing the prompt here
"""

from __future__ import annotations

import time

from engine import LLMEngine
from kv_transfer.base import TransferRecord, failure_kind
from worker.metric_set import Kind, MetricDef, MetricSet

_STEP_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
_TOKEN_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192)
_XFER_BUCKETS: tuple[float, ...] = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01)
_XFER_BUCKETS += (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATE_BUCKETS: tuple[float, ...] = (1e6, 1e7, 1e8, 2.5e8, 5e8, 1e9, 2.5e9, 5e9, 1e10, 2.5e10)
_RATE_BUCKETS += (5e10, 1e11)

UP = MetricDef("pdserve_up", Kind.GAUGE, "1 for each live pdserve process", ("role",))
WAITING = MetricDef(
    "pdserve_engine_waiting_sequences", Kind.GAUGE, "Sequences waiting to be scheduled"
)
RUNNING = MetricDef("pdserve_engine_running_sequences", Kind.GAUGE, "Sequences in the batch")
QUEUED_TOKENS = MetricDef(
    "pdserve_engine_queued_prefill_tokens", Kind.GAUGE, "Prompt tokens not computed yet"
)
KV_USED = MetricDef("pdserve_engine_kv_used_blocks", Kind.GAUGE, "KV cache blocks in use")
KV_FREE = MetricDef("pdserve_engine_kv_free_blocks", Kind.GAUGE, "KV cache blocks free")
PREFIX_LOOKUPS = MetricDef(
    "pdserve_engine_prefix_cache_lookup_blocks", Kind.COUNTER, "Full prompt blocks looked up"
)
PREFIX_HITS = MetricDef(
    "pdserve_engine_prefix_cache_hit_blocks", Kind.COUNTER, "Looked-up blocks found cached"
)
PREEMPTIONS = MetricDef(
    "pdserve_engine_preemptions",
    Kind.COUNTER,
    "Sequences preempted (recomputed later)",
    initial=((),),
)
STEP_SECONDS = MetricDef(
    "pdserve_engine_step_seconds", Kind.HISTOGRAM, "Engine step time", buckets=_STEP_BUCKETS
)
STEP_TOKENS = MetricDef(
    "pdserve_engine_step_tokens",
    Kind.HISTOGRAM,
    "Tokens computed per engine step",
    buckets=tuple(float(b) for b in _TOKEN_BUCKETS),
)
ENGINE = (
    WAITING,
    RUNNING,
    QUEUED_TOKENS,
    KV_USED,
    KV_FREE,
    PREFIX_LOOKUPS,
    PREFIX_HITS,
    PREEMPTIONS,
    STEP_SECONDS,
    STEP_TOKENS,
)

_ROLE = ("role",)  # send | recv
XFER_DONE = MetricDef(
    "pdserve_kv_transfers_completed", Kind.COUNTER, "KV transfers done on this rank", _ROLE
)
XFER_ERRORS = MetricDef(
    "pdserve_kv_transfer_errors",
    Kind.COUNTER,
    "KV transfers failed on this rank, by kind of failure",
    ("role", "reason"),
)
XFER_BYTES = MetricDef(
    "pdserve_kv_transfer_bytes", Kind.COUNTER, "KV payload bytes moved by this rank", _ROLE
)
XFER_BLOCKS = MetricDef(
    "pdserve_kv_transfer_blocks", Kind.COUNTER, "Prompt blocks moved by this rank", _ROLE
)
XFER_SECONDS = MetricDef(
    "pdserve_kv_transfer_duration_seconds",
    Kind.HISTOGRAM,
    "A transfer's time from its first data message to its end (overlaps the prefill)",
    _ROLE,
    _XFER_BUCKETS,
)
XFER_RATE = MetricDef(
    "pdserve_kv_transfer_throughput_bytes_per_second",
    Kind.HISTOGRAM,
    "A transfer's bytes over its duration (a floor of the link's bandwidth)",
    _ROLE,
    _RATE_BUCKETS,
)
RECOMPUTED = MetricDef(
    "pdserve_kv_recomputed_blocks",
    Kind.COUNTER,
    "Prompt blocks a decode instance computed itself after a remote prefill fell back",
    ("reason",),
)
TRANSFER = (XFER_DONE, XFER_ERRORS, XFER_BYTES, XFER_BLOCKS, XFER_SECONDS, XFER_RATE, RECOMPUTED)
DEFINITIONS = (UP, *ENGINE, *TRANSFER)


class EngineMetrics:
    """The engine's figures; every method runs on the engine thread."""

    def __init__(self, metrics: MetricSet, sample_interval_s: float = 0.25) -> None:
        self._step_s = metrics[STEP_SECONDS]
        self._step_tokens = metrics[STEP_TOKENS]
        self._gauges = [metrics[d] for d in (WAITING, RUNNING, QUEUED_TOKENS, KV_USED, KV_FREE)]
        self._lookups, self._hits = metrics[PREFIX_LOOKUPS], metrics[PREFIX_HITS]
        self._preemptions = metrics[PREEMPTIONS]
        self._seen = (0, 0, 0)  # lookups, hits, preemptions already counted
        self._interval_s = sample_interval_s
        self._next = 0.0

    def stepped(self, seconds: float, tokens: int) -> None:
        self._step_s.observe(seconds)
        self._step_tokens.observe(tokens)

    def sample(self, engine: LLMEngine, now: float | None = None) -> None:
        """Gauges and counters from the engine's state, unless sampled recently."""
        now = time.monotonic() if now is None else now
        if now < self._next:
            return
        self._next = now + self._interval_s
        load = engine.load()
        used = load.total_blocks - load.free_blocks
        values = (load.waiting_seqs, load.running_seqs, load.queued_prefill_tokens, used)
        for gauge, value in zip(self._gauges, (*values, load.free_blocks), strict=True):
            gauge.set(value)
        stats = engine.block_pool.stats
        counts = (stats.prefix_queries, stats.prefix_hits, engine.scheduler.num_preemptions)
        for counter, new, old in zip(
            (self._lookups, self._hits, self._preemptions), counts, self._seen, strict=True
        ):
            counter.inc(new - old)
        self._seen = counts


class TransferMetrics:
    """One rank's KV-transfer figures (any thread; each call records a few series)."""

    def __init__(self, metrics: MetricSet) -> None:
        self._m = metrics

    def record(self, r: TransferRecord) -> None:
        m = self._m
        if r.nbytes:
            m[XFER_BYTES].labels(r.role).inc(r.nbytes)
            m[XFER_BLOCKS].labels(r.role).inc(r.blocks)
        if not r.ok:
            m[XFER_ERRORS].labels(r.role, failure_kind(r.reason)).inc()
            return
        m[XFER_DONE].labels(r.role).inc()
        if r.duration_s > 0:
            m[XFER_SECONDS].labels(r.role).observe(r.duration_s)
            m[XFER_RATE].labels(r.role).observe(r.nbytes / r.duration_s)

    def recomputed(self, blocks: int, reason: str) -> None:
        self._m[RECOMPUTED].labels(reason).inc(blocks)


def pool_metrics(pool: str, replica: str, rank: int, role: str) -> MetricSet:
    """A pool process's metrics, with its `pdserve_up` set."""
    metrics = MetricSet(DEFINITIONS, {"pool": pool, "replica": replica, "rank": str(rank)})
    metrics[UP].labels(role).set(1)
    return metrics
