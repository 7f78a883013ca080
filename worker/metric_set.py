"""Metrics that every pdserve process records: one definition, two sinks.

A `MetricDef` names a metric once (Prometheus conventions: a `pdserve_` prefix, the
unit in the name, and counters without `_total`, which both sinks append). A
`MetricSet` builds handles for a process's definitions over

* a per-process `prometheus_client` registry (`MetricSet.registry`): no global state,
  so a test or a second instance in the same process starts from zero; the router
  serves its own at /metrics;
* Ray's metrics API (`ray.util.metrics`), when the process is part of a Ray cluster:
  Ray's core worker aggregates the records in-process and its node's metrics agent
  exports every process's metrics on the node's metrics export port, so one scrape
  of it sees every router, pool replica and rank actor. There every name gets Ray's
  `ray_` prefix and the process's identity labels (`pool`, `replica`, `rank`).

Recording is an in-process call on both sinks (no RPC): a few microseconds per record.
A daemon thread re-records each exported gauge's latest value every second, since Ray's
agent drops gauge series that are not refreshed.
Callers on hot paths bind their label values once (`Metric.labels`) and record on the
bound child.

A counter of rare events (failures, retries, migrations) names the label values it
can take in `MetricDef.initial`: those series exist from the start at zero, so a
dashboard shows a healthy cluster's zero instead of no data, which would look the
same as a missing exporter.
"""

from __future__ import annotations

import enum
import logging
import re
import threading
import time
import weakref
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge as PromGauge
from prometheus_client import Histogram as PromHistogram

logger = logging.getLogger(__name__)

IDENTITY_LABELS = ("pool", "replica", "rank")
RAY_PREFIX = "ray_"  # what Ray's exporter puts before every application metric

_NAME = re.compile(r"^pdserve_[a-z][a-z0-9_]*[a-z0-9]$")
_LABEL = re.compile(r"^[a-z][a-z0-9_]*$")


# Every definition made in this process, by name (for the dashboard's check, and so
# that one name never means two metrics).
DEFINED: dict[str, MetricDef] = {}


class Kind(enum.Enum):
    COUNTER = "counter"
    GAUGE = "gauge"
    HISTOGRAM = "histogram"


@dataclass(frozen=True)
class MetricDef:
    name: str
    kind: Kind
    help: str
    labels: tuple[str, ...] = ()
    buckets: tuple[float, ...] = ()
    # label values whose series start at zero (counters); `((),)` for one unlabelled
    initial: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"metric name {self.name!r}: want pdserve_<snake_case>")
        if self.kind is Kind.COUNTER and self.name.endswith("_total"):
            raise ValueError(f"counter {self.name!r}: the sinks append _total themselves")
        bad = [x for x in self.labels if not _LABEL.match(x) or x in IDENTITY_LABELS]
        if bad or len(set(self.labels)) != len(self.labels):
            raise ValueError(f"metric {self.name!r}: bad labels {self.labels}")
        if (self.kind is Kind.HISTOGRAM) != bool(self.buckets):
            raise ValueError(f"metric {self.name!r}: buckets go with histograms only")
        if list(self.buckets) != sorted(set(self.buckets)) or any(b <= 0 for b in self.buckets):
            raise ValueError(f"metric {self.name!r}: buckets must be positive and increasing")
        if self.initial and (
            self.kind is not Kind.COUNTER or any(len(v) != len(self.labels) for v in self.initial)
        ):
            raise ValueError(f"metric {self.name!r}: initial values are label values of a counter")
        known = DEFINED.setdefault(self.name, self)
        if known != self:
            raise ValueError(f"metric {self.name!r} is defined twice, differently")

    def exported_names(self, prefix: str = "") -> tuple[str, ...]:
        """The sample names a scrape shows for this metric."""
        base = prefix + self.name
        if self.kind is Kind.COUNTER:
            return (base + "_total",)
        if self.kind is Kind.HISTOGRAM:
            return (base + "_bucket", base + "_sum", base + "_count")
        return (base,)


def ray_exporting() -> bool:
    """Whether this process is connected to Ray (so Ray's metrics API records)."""
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a dependency
        return False
    return bool(ray.is_initialized())


class _GaugeRefresher:
    """Re-records the latest value of every gauge exported through Ray every
    `interval_s`: Ray's metrics agent drops a gauge series that no record refreshed
    within two report intervals, which would hide a value set once (a process's
    `pdserve_up`, an idle router's in-flight count). One daemon thread per process,
    started with the first gauge; it holds the gauges weakly."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval_s = interval_s
        self._gauges: weakref.WeakSet[Child] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def add(self, child: Child) -> None:
        with self._lock:
            self._gauges.add(child)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="metrics-gauges", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            time.sleep(self._interval_s)
            with self._lock:
                gauges = list(self._gauges)
            for child in gauges:
                try:
                    child.refresh()
                except Exception:  # never let one series stop the others
                    logger.debug("refreshing a gauge failed", exc_info=True)


_REFRESHER = _GaugeRefresher()


class Child:
    """One metric's series for fixed label values, in both sinks."""

    __slots__ = ("__weakref__", "_kind", "_last", "_prom", "_ray", "_tags")

    def __init__(self, kind: Kind, prom: Any, ray_metric: Any, tags: dict[str, str]) -> None:
        self._kind, self._prom, self._ray, self._tags = kind, prom, ray_metric, tags
        self._last: float | None = None  # a gauge's latest value

    def inc(self, value: float = 1.0) -> None:
        if value <= 0:
            return  # Ray refuses zero increments; nothing to count
        self._prom.inc(value)
        if self._ray is not None:
            self._ray.inc(value, self._tags)

    def zero(self) -> None:
        """Make a counter's series exist at zero in both sinks (prometheus_client made it
        when the child was created). Ray's `Counter.inc` refuses zero; `_record` is the
        call it makes after that check, and Ray's recorder exports a zero point."""
        record = getattr(self._ray, "_record", None)
        if record is not None:
            record(0.0, self._tags)

    def set(self, value: float) -> None:
        self._prom.set(value)
        if self._ray is not None:
            if self._last is None:
                _REFRESHER.add(self)
            self._last = value
            self._ray.set(value, self._tags)

    def refresh(self) -> None:
        """Record a gauge's latest value again (Ray only)."""
        last = self._last
        if self._ray is not None and last is not None:
            self._ray.set(last, self._tags)

    def observe(self, value: float) -> None:
        self._prom.observe(value)
        if self._ray is not None:
            self._ray.observe(value, self._tags)


class Metric:
    """A metric of a `MetricSet`; with labels, `labels(...)` gives the child to record
    on (cached), otherwise record on the metric itself."""

    def __init__(self, d: MetricDef, prom: Any, ray_metric: Any) -> None:
        self.definition = d
        self._prom, self._ray = prom, ray_metric
        self._children: dict[tuple[str, ...], Child] = {}
        self._plain = None if d.labels else Child(d.kind, prom, ray_metric, {})

    def labels(self, *values: str) -> Child:
        child = self._children.get(values)
        if child is None:
            d = self.definition
            if len(values) != len(d.labels):
                raise ValueError(f"{d.name}: labels {d.labels}, got {values}")
            tags = dict(zip(d.labels, values, strict=True))
            child = Child(d.kind, self._prom.labels(*values), self._ray, tags)
            self._children[values] = child
        return child

    def _unlabelled(self) -> Child:
        if self._plain is None:
            raise ValueError(f"{self.definition.name} has labels {self.definition.labels}")
        return self._plain

    def zero(self, *values: str) -> None:
        """The series of these label values exists from now on (a counter's, at 0)."""
        (self.labels(*values) if values else self._unlabelled()).zero()

    def inc(self, value: float = 1.0) -> None:
        self._unlabelled().inc(value)

    def set(self, value: float) -> None:
        self._unlabelled().set(value)

    def observe(self, value: float) -> None:
        self._unlabelled().observe(value)


class MetricSet:
    """The handles of a process's metrics. `identity` (pool, replica, rank) labels every
    series exported through Ray; the per-process registry leaves it out, since it holds
    one process's series only. `ray_export=None` exports when Ray is initialized."""

    def __init__(
        self,
        defs: Iterable[MetricDef],
        identity: Mapping[str, str] | None = None,
        *,
        ray_export: bool | None = None,
    ) -> None:
        self.identity = dict(identity or {})
        unknown = set(self.identity) - set(IDENTITY_LABELS)
        if unknown:
            raise ValueError(f"identity labels {sorted(unknown)}: want {IDENTITY_LABELS}")
        self.registry = CollectorRegistry(auto_describe=True)
        self.ray_export = ray_exporting() if ray_export is None else ray_export
        self._metrics: dict[str, Metric] = {}
        for d in defs:
            if d.name in self._metrics:
                raise ValueError(f"metric {d.name!r} defined twice")
            metric = self._metrics[d.name] = Metric(d, self._prom(d), self._ray(d))
            for values in d.initial:
                metric.zero(*values)

    def __getitem__(self, d: MetricDef) -> Metric:
        return self._metrics[d.name]

    def _prom(self, d: MetricDef) -> Any:
        r = self.registry
        if d.kind is Kind.COUNTER:
            return PromCounter(d.name, d.help, d.labels, registry=r)
        if d.kind is Kind.GAUGE:
            return PromGauge(d.name, d.help, d.labels, registry=r)
        return PromHistogram(d.name, d.help, d.labels, buckets=d.buckets, registry=r)

    def _ray(self, d: MetricDef) -> Any:
        if not self.ray_export:
            return None
        from ray.util import metrics

        keys = (*IDENTITY_LABELS, *d.labels)
        m: Any
        if d.kind is Kind.COUNTER:
            m = metrics.Counter(d.name, d.help, keys)
        elif d.kind is Kind.GAUGE:
            m = metrics.Gauge(d.name, d.help, keys)
        else:
            m = metrics.Histogram(d.name, d.help, list(d.buckets), keys)
        defaults = {k: self.identity.get(k, "") for k in IDENTITY_LABELS}
        return m.set_default_tags(defaults)

    def sample(self, name: str, labels: Mapping[str, str] | None = None) -> float:
        """A sample of the per-process registry (0 when absent), e.g. for tests."""
        value = self.registry.get_sample_value(name, dict(labels or {}))
        return 0.0 if value is None else value


def identity(pool: str, replica: str, rank: int = 0) -> dict[str, str]:
    return {"pool": pool, "replica": replica, "rank": str(rank)}


def all_names(defs: Sequence[MetricDef], prefix: str = "") -> set[str]:
    return {n for d in defs for n in d.exported_names(prefix)}
