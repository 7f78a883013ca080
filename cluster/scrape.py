"""Reading the cluster's metrics back: one scrape of each Ray node's metrics export,
parsed into samples, and the figures `pdserve status` shows.

Every pdserve process exports through Ray (worker.metric_set), which prefixes each
name with `ray_`; `Samples` strips it, so queries use the names the code defines.
`Figures.between(before, after)` turns two scrapes into rates over the interval
(tokens per second, transfer bandwidth, TTFT percentiles of the requests in it).
"""

from __future__ import annotations

import math
import urllib.request
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from worker.metric_set import RAY_PREFIX

Labels = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Mapping[str, str]
    value: float


class Samples:
    """The pdserve samples of one or more scrapes, by name (without Ray's prefix)."""

    def __init__(self, samples: Iterable[Sample]) -> None:
        self._by_name: dict[str, list[Sample]] = defaultdict(list)
        for s in samples:
            name = s.name.removeprefix(RAY_PREFIX)
            if name.startswith("pdserve_"):
                self._by_name[name].append(Sample(name, s.labels, s.value))

    @classmethod
    def parse(cls, text: str) -> Samples:
        return cls(
            Sample(s.name, s.labels, s.value)
            for family in text_string_to_metric_families(text)
            for s in family.samples
        )

    def names(self) -> set[str]:
        return set(self._by_name)

    def get(self, name: str, **match: str) -> list[Sample]:
        return [
            s
            for s in self._by_name.get(name, [])
            if all(s.labels.get(k) == v for k, v in match.items())
        ]

    def sum(self, name: str, **match: str) -> float:
        return sum(s.value for s in self.get(name, **match))

    def by(self, name: str, keys: tuple[str, ...], **match: str) -> dict[tuple[str, ...], float]:
        """The samples' values summed per value of the label `keys`."""
        out: dict[tuple[str, ...], float] = defaultdict(float)
        for s in self.get(name, **match):
            out[tuple(s.labels.get(k, "") for k in keys)] += s.value
        return dict(out)


def scrape(urls: Iterable[str], timeout_s: float = 5.0) -> Samples:
    """One scrape of each metrics export (raises OSError when one cannot be read)."""
    text = []
    for url in urls:
        with urllib.request.urlopen(url, timeout=timeout_s) as resp:
            text.append(resp.read().decode())
    return Samples.parse("\n".join(text))


def quantile(q: float, buckets: Mapping[float, float]) -> float | None:
    """The `q` quantile of a histogram's cumulative bucket counts (by upper bound),
    interpolated within its bucket as Prometheus' histogram_quantile does."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    rank = q * buckets[bounds[-1]]
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank:
            if math.isinf(bound):
                return lower
            span = count - below
            return lower + (bound - lower) * ((rank - below) / span if span else 1.0)
        lower, below = bound, count
    return None


def bucket_deltas(before: Samples, after: Samples, name: str, **match: str) -> dict[float, float]:
    """A histogram's bucket counts that grew between two scrapes, summed over the
    series whose labels match."""

    def cumulative(s: Samples) -> dict[float, float]:
        out: dict[float, float] = defaultdict(float)
        for x in s.get(name + "_bucket", **match):
            out[float(x.labels["le"])] += x.value
        return out

    a, b = cumulative(before), cumulative(after)
    return {le: max(0.0, b[le] - a.get(le, 0.0)) for le in b}
