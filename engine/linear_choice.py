"""Choosing a CPU path per class of row counts by measuring it, once per host and model.

A model's matmuls see three kinds of inputs: one row (a batch-1 decode step), a decode
batch (one row per running sequence) and a prefill chunk (hundreds of rows). Which
kernel is fastest differs between them and between CPUs (a kernel tuned for AVX-512
can lose to oneDNN on an AVX2 host, or win at one row and lose at 512). So at load the
candidates are timed on the model's own shapes, one representative row count per
class (`RowClasses`), and each class gets its fastest candidate, or a near-fastest one
that another class keeps anyway.

- `time_interleaved` runs the candidates in turns, several rounds, and keeps each one's
  fastest round: on a busy host noise only ever adds time. A candidate more than
  `_DROP_RATIO` times slower than the best after the first round is not repeated.
- `choose` turns a measurement into a `Choice`, read from or written to a JSON cache
  file first; the pick from the seconds is injected too (`Pick`). `fastest` takes each
  class's fastest candidate. `fewest_copies` is for candidates that each keep a copy of
  the weights: it keeps as few as it can, letting a class run a path that is at most
  `min_gain` slower than its fastest (and, given a reference such as oneDNN, no slower
  than that), so a second or third copy is kept only for a gain worth its memory. A
  cache file that is unreadable, for another key, or names an unknown class or
  candidate is ignored and rewritten. The measurement is injected (`Measure`), so the
  selection can be driven with a table.

The caller keys the cache by everything that can change the answer: the kernel build
(its directory already hashes sources, flags, compiler and CPU), the model's shapes,
the dtype and the thread count.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_VERSION = 1
_DROP_RATIO = 3.0
_BUSY_CPUS = 0.5  # other processes' CPUs above which a measurement is not cached

# (class name, its row count, the candidates) -> seconds per candidate
Measure = Callable[[str, int, Sequence[str]], Mapping[str, float]]
# the seconds per class and candidate -> the candidate per class
Pick = Callable[[Mapping[str, Mapping[str, float]]], dict[str, str]]
# Starts a window; the returned function gives the CPUs other processes used since.
BusyMeter = Callable[[], Callable[[], float]]


@dataclass(frozen=True)
class RowClasses:
    """The representative row count of each class, and which rows a call falls in."""

    decode_rows: int
    prefill_rows: int

    @classmethod
    def for_engine(cls, max_num_seqs: int, max_num_batched_tokens: int) -> RowClasses:
        """A decode batch of up to 32 sequences, a prefill chunk of up to 512 tokens."""
        decode = max(1, min(max_num_seqs, 32))
        return cls(decode, max(decode, min(max_num_batched_tokens, 512)))

    def rows(self) -> dict[str, int]:
        """The classes this engine sees, with their row counts (a class whose rows
        equal a smaller class's is left out)."""
        out = {"one": 1}
        if self.decode_rows > 1:
            out["decode"] = self.decode_rows
        if self.prefill_rows > max(out.values()):
            out["prefill"] = self.prefill_rows
        return out

    def class_of(self, rows: int) -> str:
        """The class a call with `rows` rows falls in: one row, else the nearer of the
        decode and prefill representatives on a log scale."""
        present = self.rows()
        if rows <= 1 or len(present) == 1:
            return "one"
        if "prefill" not in present:
            return "decode"
        if "decode" not in present or rows * rows > self.decode_rows * self.prefill_rows:
            return "prefill"
        return "decode"


@dataclass(frozen=True)
class Choice:
    """The candidate picked per class, with the seconds that decided it."""

    picked: dict[str, str]
    seconds: dict[str, dict[str, float]]
    from_cache: bool = False

    def describe(self) -> str:
        parts = []
        for cls, pick in self.picked.items():
            times = ", ".join(f"{c} {s * 1e3:.2f} ms" for c, s in self.seconds[cls].items())
            parts.append(f"{cls}: {pick} ({times})")
        return "; ".join(parts)


def fastest(seconds: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
    """Each class's fastest candidate."""
    return {cls: min(times, key=times.__getitem__) for cls, times in seconds.items()}


def fewest_copies(
    min_gain: float,
    reference: str | None = None,
    keep: Callable[[Mapping[str, Mapping[str, float]]], set[str]] = lambda _: set(),
) -> Pick:
    """A `Pick` for candidates that each cost a copy of the weights: the smallest set of
    candidates that serves every class with one that is at most `min_gain` (a fraction)
    slower than the class's fastest and, where the class measured `reference`, no
    slower than it; among sets of that size, the one whose classes lose the least time
    (summed relative to each class's fastest). The set always holds `keep(seconds)`."""
    if min_gain < 0:
        raise ValueError(f"min_gain must be >= 0, got {min_gain}")

    def pick(seconds: Mapping[str, Mapping[str, float]]) -> dict[str, str]:
        def ok(cls: str, c: str) -> bool:
            times = seconds[cls]
            bound = min(times.values()) * (1 + min_gain)
            if reference in times:
                bound = min(bound, times[reference])  # type: ignore[index]
            return c in times and times[c] <= bound

        names = sorted({c for times in seconds.values() for c in times})
        kept_anyway = keep(seconds) & set(names)
        for size in range(max(1, len(kept_anyway)), len(names) + 1):
            best: tuple[float, dict[str, str]] | None = None
            for kept in itertools.combinations(names, size):
                if not kept_anyway <= set(kept):
                    continue
                if not all(any(ok(cls, c) for c in kept) for cls in seconds):
                    continue
                picked = {
                    cls: min((c for c in kept if ok(cls, c)), key=seconds[cls].__getitem__)
                    for cls in seconds
                }
                loss = sum(seconds[k][c] / min(seconds[k].values()) for k, c in picked.items())
                if best is None or loss < best[0]:
                    best = (loss, picked)
            if best is not None:
                return best[1]
        return fastest(seconds)  # unreachable: the fastest of each class is always ok

    return pick


def cache_key(**parts: Any) -> str:
    """A short stable hash of `parts` (JSON-serialisable values)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:20]


def choose(
    what: str,
    classes: Mapping[str, int],
    candidates: Sequence[str],
    measure: Measure,
    cache_file: Path | None,
    key: str,
    busy_meter: BusyMeter | None = None,
    pick: Pick = fastest,
) -> Choice:
    """The fastest candidate per class: from `cache_file` when it holds a valid record
    for `key`, else measured, and written there unless other processes kept more than
    half a CPU busy meanwhile (`busy_meter`; then the next load measures again). The
    candidate per class is `pick` of the seconds, cached or measured. A single
    candidate is not timed."""
    if len(candidates) == 1:
        return Choice({c: candidates[0] for c in classes}, {c: {} for c in classes})
    if cache_file is not None:
        cached = _read(cache_file, key, classes, candidates)
        if cached is not None:
            cached = Choice(pick(cached.seconds), cached.seconds, from_cache=True)
            log.info("%s (cached in %s): %s", what, cache_file.name, cached.describe())
            return cached
    began = time.perf_counter()
    others = (busy_meter or others_busy)()
    seconds = {cls: dict(measure(cls, rows, candidates)) for cls, rows in classes.items()}
    busy = others()
    for cls, times in seconds.items():
        if not times or set(times) - set(candidates):
            raise ValueError(f"{what}: the measurement of {cls} named no known candidate")
    choice = Choice(pick(seconds), seconds)
    log.info(
        "%s, measured in %.2f s (other processes used %.2f CPUs%s): %s",
        what, time.perf_counter() - began, busy,
        "; not cached" if busy > _BUSY_CPUS else "", choice.describe(),
    )  # fmt: skip
    if cache_file is not None and busy <= _BUSY_CPUS:
        _write(cache_file, key, choice)
    return choice


def others_busy() -> Callable[[], float]:
    """A `BusyMeter` from /proc/stat (the host's busy time) less this process's own
    CPU time; 0 where /proc/stat can't be read."""

    def snapshot() -> tuple[float, float, float]:
        t = os.times()
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:9]]
        except (OSError, ValueError):
            return time.perf_counter(), math.nan, t.user + t.system
        host = sum(ticks) - ticks[3] - ticks[4]  # all but idle and iowait
        return time.perf_counter(), host / os.sysconf("SC_CLK_TCK"), t.user + t.system

    wall0, host0, self0 = snapshot()

    def since() -> float:
        wall, host, own = snapshot()
        if math.isnan(host0) or math.isnan(host) or wall - wall0 <= 0:
            return 0.0
        return max(0.0, ((host - host0) - (own - self0)) / (wall - wall0))

    return since


def time_interleaved(
    fns: Mapping[str, Callable[[], object]],
    rounds: int = 5,
    budget_s: float = 0.5,
    clock: Callable[[], float] = time.perf_counter,
) -> dict[str, float]:
    """Each callable's fastest time over up to `rounds` interleaved rounds, after one
    untimed warm-up call each. Rounds stop once `budget_s` is spent (two at least),
    and a candidate much slower than the best after the first round is not repeated."""
    for fn in fns.values():
        fn()
    best: dict[str, float] = {}
    live = list(fns)
    began = clock()
    for r in range(rounds):
        for name in live:
            t0 = clock()
            fns[name]()
            best[name] = min(best.get(name, math.inf), clock() - t0)
        if r == 0:
            fastest = min(best.values())
            live = [n for n in live if best[n] <= _DROP_RATIO * fastest]
        if r >= 1 and clock() - began > budget_s:
            break
    return best


def _read(
    path: Path, key: str, classes: Mapping[str, int], candidates: Sequence[str]
) -> Choice | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    try:
        ok = (
            data["version"] == _VERSION
            and data["key"] == key
            and set(data["picked"]) == set(classes)
            and all(data["picked"][c] in candidates for c in classes)
            and set(data["seconds"]) == set(classes)
        )
        seconds = {
            c: {str(n): float(s) for n, s in data["seconds"][c].items() if n in candidates}
            for c in classes
        }
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if not ok or not all(seconds.values()):
        log.debug("ignoring %s: not a choice for this key", path)
        return None
    return Choice({c: str(data["picked"][c]) for c in classes}, seconds, from_cache=True)


def _write(path: Path, key: str, choice: Choice) -> None:
    record = {"version": _VERSION, "key": key, "picked": choice.picked, "seconds": choice.seconds}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
        with os.fdopen(fd, "w") as f:
            json.dump(record, f, indent=1, sort_keys=True)
        os.replace(tmp, path)
    except OSError as e:
        log.warning("could not cache the choice in %s: %s", path, e)
