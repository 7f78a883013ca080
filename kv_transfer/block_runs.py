"""Runs of consecutive block ids, and when a copy goes run by run.

A region whose blocks form long runs is copied (or copied and summed) with one strided
op per run; short runs are moved by index instead. The thresholds are module globals
so that tests can force either way.
"""

from __future__ import annotations

import itertools

import numpy as np

# Runs of blocks are copied (or copied and summed) with one op per run, across every
# layer of a span, when they average at least this many bytes; shorter ones are gathered
# or scattered by index, one op per layer.
MIN_RUN_BYTES = 256 << 10
# A gather by index, then one sum of the gathered buffer (still in cache), beats a
# copy-and-sum per run until runs are much longer.
MIN_GATHER_RUN_BYTES = 2 << 20


def consecutive(ids: tuple[int, ...]) -> bool:
    return ids == tuple(range(ids[0], ids[0] + len(ids))) if ids else True


def _run_starts(*id_lists: tuple[int, ...]) -> list[int]:
    """Positions where a run of ids consecutive in every list starts, then the length."""
    n = len(id_lists[0])
    if all(consecutive(ids) for ids in id_lists):  # the common case, without numpy
        return [0, n]
    breaks = np.zeros(max(n - 1, 0), dtype=bool)
    for ids in id_lists:
        breaks |= np.diff(np.asarray(ids, dtype=np.int64)) != 1
    return [0, *(np.flatnonzero(breaks) + 1).tolist(), n]


def runs(block_ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(position, first block id, length) for each run of consecutive block ids."""
    starts = _run_starts(block_ids)
    return [(p, block_ids[p], q - p) for p, q in itertools.pairwise(starts)]


def paired_runs(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(id in a, id in b, length) for each run consecutive in both."""
    if len(a) != len(b):
        raise ValueError("block lists differ in length")
    starts = _run_starts(a, b)
    return [(a[p], b[p], q - p) for p, q in itertools.pairwise(starts)]


def long_runs(num_runs: int, nbytes: int, gather: bool = False) -> bool:
    """Whether `num_runs` runs of blocks holding `nbytes` in all are long enough to copy
    run by run (one copy, or one copy-and-sum, each); `gather`: to gather and sum."""
    floor = MIN_GATHER_RUN_BYTES if gather else MIN_RUN_BYTES
    return num_runs == 1 or nbytes >= num_runs * floor
