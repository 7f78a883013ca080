"""Block regions of a paged KV cache, and the copies and checksums over them.

A `BlockRegion` names one layer's K and V for a range of local KV heads over a list of
blocks of a cache tensor `[layer, kv, block, slot, head, dim]` (engine/kv_cache.py).
Its contiguous form, the payload of a DATA message, has shape
`[2, num_blocks, block_size, num_heads, head_dim]`.

Copies read runs of consecutive block ids as plain strided views, so a region of
contiguous blocks moves with one copy per run. Blocks in short runs move, and are
summed, by id: on the CPU with one call of the engine's native kernel for a whole
region or span (`word_sums.by_id`), elsewhere with index_select/index_copy_. A region's
checksum (kv_transfer.word_sums) equals its gathered payload's.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from functools import cached_property
from typing import cast

import numpy as np
import torch

from kv_transfer import word_sums
from kv_transfer.word_sums import block_sums, checksum, fold, fold_runs

# Runs of blocks are copied (or copied and summed) with one op per run, across every
# layer of a span, when they average at least this many bytes; shorter ones are gathered
# or scattered by index, one op per layer.
_MIN_RUN_BYTES = 256 << 10
# A gather by index, then one sum of the gathered buffer (still in cache), beats a
# copy-and-sum per run until runs are much longer.
_MIN_GATHER_RUN_BYTES = 2 << 20


def _consecutive(ids: tuple[int, ...]) -> bool:
    return ids == tuple(range(ids[0], ids[0] + len(ids))) if ids else True


def _run_starts(*id_lists: tuple[int, ...]) -> list[int]:
    """Positions where a run of ids consecutive in every list starts, then the length."""
    n = len(id_lists[0])
    if all(_consecutive(ids) for ids in id_lists):  # the common case, without numpy
        return [0, n]
    breaks = np.zeros(max(n - 1, 0), dtype=bool)
    for ids in id_lists:
        breaks |= np.diff(np.asarray(ids, dtype=np.int64)) != 1
    return [0, *(np.flatnonzero(breaks) + 1).tolist(), n]


def runs(block_ids: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(position, first block id, length) for each run of consecutive block ids."""
    starts = _run_starts(block_ids)
    return [(p, block_ids[p], q - p) for p, q in itertools.pairwise(starts)]


def _paired_runs(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(id in a, id in b, length) for each run consecutive in both."""
    if len(a) != len(b):
        raise ValueError("block lists differ in length")
    starts = _run_starts(a, b)
    return [(a[p], b[p], q - p) for p, q in itertools.pairwise(starts)]


def _long_runs(num_runs: int, nbytes: int, gather: bool = False) -> bool:
    """Whether `num_runs` runs of blocks holding `nbytes` in all are long enough to copy
    run by run (one copy, or one copy-and-sum, each); `gather`: to gather and sum."""
    floor = _MIN_GATHER_RUN_BYTES if gather else _MIN_RUN_BYTES
    return num_runs == 1 or nbytes >= num_runs * floor


def _check_payload(
    payload: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, what: str
) -> None:
    if tuple(payload.shape) != shape or payload.dtype != dtype:
        raise ValueError(
            f"payload {tuple(payload.shape)} {payload.dtype} does not fit {what} {shape} {dtype}"
        )


@dataclass(frozen=True)
class BlockRegion:
    """`cache[layer, :, block_ids, :, head_start:head_stop, :]` (local indices)."""

    cache: torch.Tensor
    layer: int
    head_start: int
    head_stop: int
    block_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        num_layers, _, num_blocks, _, num_heads, _ = self.cache.shape
        if not 0 <= self.layer < num_layers:
            raise IndexError(f"layer {self.layer} outside [0, {num_layers})")
        if not 0 <= self.head_start < self.head_stop <= num_heads:
            raise IndexError(f"heads [{self.head_start}, {self.head_stop}) outside {num_heads}")
        if not self.block_ids or min(self.block_ids) < 0 or max(self.block_ids) >= num_blocks:
            raise IndexError(f"block ids outside [0, {num_blocks})")

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        _, _, _, slots, _, dim = self.cache.shape
        return (2, len(self.block_ids), slots, self.head_stop - self.head_start, dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.dtype

    @property
    def device(self) -> torch.device:
        return self.cache.device

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.cache.element_size()

    @cached_property
    def _layer(self) -> torch.Tensor:
        return self.cache[self.layer, :, :, :, self.head_start : self.head_stop]

    @property
    def _blocks(self) -> torch.Tensor:
        """Every block of the cache, with the region's layer and heads (`_index` picks)."""
        return self._layer

    @property
    def dense(self) -> bool:
        """One run of blocks with all the cache's heads: K and V are each contiguous."""
        return (
            len(self._runs) == 1 and self.head_start == 0 and self.head_stop == self.cache.shape[4]
        )

    @cached_property
    def _runs(self) -> list[tuple[int, int, int]]:
        return runs(self.block_ids)

    @cached_property
    def _index(self) -> torch.Tensor:
        return torch.tensor(self.block_ids, dtype=torch.long, device=self.cache.device)

    def run_view(self, first_block: int, length: int) -> torch.Tensor:
        """A strided view of blocks `first_block ... first_block + length - 1`."""
        return self._layer[:, first_block : first_block + length]

    @cached_property
    def _view(self) -> torch.Tensor | None:
        """[2, n, slot, head, dim] as one strided view, over one run of blocks."""
        block_runs = self._runs
        return self.run_view(block_runs[0][1], block_runs[0][2]) if len(block_runs) == 1 else None

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The region's contiguous copy (into `out` when given)."""
        view = self._view
        if view is not None:
            if out is None:
                return view.clone(memory_format=torch.contiguous_format)
            return out.copy_(view)
        if out is None:
            return torch.index_select(self._layer, 1, self._index)
        return torch.index_select(self._layer, 1, self._index, out=out)

    def scatter(self, payload: torch.Tensor) -> None:
        """Write a contiguous [2, n, slot, head, dim] payload into the region."""
        _check_payload(payload, self.shape, self.dtype, "region")
        block_runs = self._runs
        if _long_runs(len(block_runs), self.nbytes):
            for pos, block, n in block_runs:
                self.run_view(block, n).copy_(payload[:, pos : pos + n])
        else:
            self._layer.index_copy_(1, self._index, payload)

    def copy_from(self, src: BlockRegion) -> None:
        """Copy `src` (same shape) into this region: one copy when runs are long."""
        if src.shape != self.shape or src.dtype != self.dtype:
            raise ValueError(f"region {src.shape} {src.dtype} does not fit {self.shape}")
        if not _copy_fast(self, src):
            self.scatter(src.gather())

    def checksum(self) -> int:
        return _checksum(self)

    def private_copy(self) -> BlockRegion:
        """A region over a copy of these bytes, in a cache of its own."""
        _, n, _, heads, _ = self.shape
        return BlockRegion(self.gather().unsqueeze(0), 0, 0, heads, tuple(range(n)))

    def flip_byte(self) -> None:
        """Invert one byte of the region (fault injection only)."""
        first = self.run_view(self.block_ids[0], 1)
        first.view(torch.uint8)[0, 0, 0, 0, 0].bitwise_not_()


@dataclass(frozen=True)
class LayerSpan:
    """`cache[layer : layer + layer_count, :, block_ids, :, head_start:head_stop]`: the
    same heads and blocks of consecutive layers, the payload of a DATA message that
    covers `header.layer_count` layers (contiguous form `[layers, 2, n, slot, head,
    dim]`). Building one costs the same for any number of
    layers; over one run of blocks it is one strided view of the cache, so a span is
    checksummed and copied with one op each. Its checksum covers every layer's blocks,
    in layer order, and a one-layer span's equals its region's."""

    cache: torch.Tensor
    layer: int
    layer_count: int
    head_start: int
    head_stop: int
    block_ids: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.layer_count < 1:
            raise ValueError(f"a layer span needs at least one layer, got {self.layer_count}")
        if self.layer + self.layer_count > self.cache.shape[0]:
            raise IndexError(
                f"layers {self.layer}+{self.layer_count} outside {self.cache.shape[0]}"
            )
        self.region(self.layer)  # raises if the heads or blocks are out of range

    def region(self, layer: int) -> BlockRegion:
        """One layer's region of the span."""
        return BlockRegion(self.cache, layer, self.head_start, self.head_stop, self.block_ids)

    @cached_property
    def regions(self) -> tuple[BlockRegion, ...]:
        """One region per layer (what a fragmented span moves, region by region)."""
        return tuple(map(self.region, range(self.layer, self.layer + self.layer_count)))

    @property
    def shape(self) -> tuple[int, ...]:
        _, _, _, slots, _, dim = self.cache.shape
        n, heads = len(self.block_ids), self.head_stop - self.head_start
        return (self.layer_count, 2, n, slots, heads, dim)

    @property
    def dtype(self) -> torch.dtype:
        return self.cache.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.cache.element_size()

    @property
    def dense(self) -> bool:
        """Every layer's region is dense: each layer's K and V are contiguous."""
        return self.region(self.layer).dense

    @cached_property
    def _runs(self) -> list[tuple[int, int, int]]:
        return runs(self.block_ids)

    @cached_property
    def _index(self) -> torch.Tensor:
        return torch.tensor(self.block_ids, dtype=torch.long, device=self.cache.device)

    @cached_property
    def _blocks(self) -> torch.Tensor:
        """Every block of the cache, with the span's layers and heads (`_index` picks)."""
        return self.cache[
            self.layer : self.layer + self.layer_count, :, :, :, self.head_start : self.head_stop
        ]

    def run_view(self, first_block: int, length: int) -> torch.Tensor:
        """`[layers, 2, length, slot, head, dim]`: a strided view of blocks
        `first_block ... first_block + length - 1` of every layer."""
        return self.cache[
            self.layer : self.layer + self.layer_count,
            :,
            first_block : first_block + length,
            :,
            self.head_start : self.head_stop,
        ]

    @cached_property
    def _view(self) -> torch.Tensor | None:
        """[layers, 2, n, slot, head, dim] as one strided view, over one run of blocks."""
        ids = self.block_ids
        if not _consecutive(ids):
            return None
        return self.cache[
            self.layer : self.layer + self.layer_count,
            :,
            ids[0] : ids[0] + len(ids),
            :,
            self.head_start : self.head_stop,
        ]

    def checksum(self) -> int:
        return _checksum(self)

    def copy_from(self, src: LayerSpan) -> None:
        if src.layer_count != self.layer_count:
            raise ValueError(f"span of {src.layer_count} layers into {self.layer_count}")
        if src.shape != self.shape or src.dtype != self.dtype:
            raise ValueError(f"span {src.shape} {src.dtype} does not fit {self.shape}")
        if _copy_fast(self, src):
            return
        for dst, part in zip(self.regions, src.regions, strict=True):
            dst.copy_from(part)

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The span's contiguous [layers, 2, n, slot, head, dim] copy (into `out`)."""
        if out is None:
            out = torch.empty(self.shape, dtype=self.dtype, device=self.cache.device)
        view = self._view
        if view is not None:
            return out.copy_(view)
        if word_sums.by_id(self._blocks, out, src_ids=self._index) is not None:
            return out
        for i, region in enumerate(self.regions):
            region.gather(out=out[i])
        return out

    def scatter(self, payload: torch.Tensor) -> None:
        """Write a contiguous [layers, 2, n, slot, head, dim] payload into the span."""
        _check_payload(payload, self.shape, self.dtype, "span")
        if (
            len(self._runs) > 1
            and word_sums.by_id(payload, self._blocks, dst_ids=self._index) is not None
        ):
            return
        if _long_runs(len(self._runs), self.nbytes):
            for pos, block, n in self._runs:
                self.run_view(block, n).copy_(payload[:, :, pos : pos + n])
            return
        for i, region in enumerate(self.regions):
            region.scatter(payload[i])

    def private_copy(self) -> LayerSpan:
        """A span over a copy of these bytes, in a cache of its own."""
        shape = self.shape
        return LayerSpan(self.gather(), 0, self.layer_count, 0, shape[4], tuple(range(shape[2])))

    def flip_byte(self) -> None:
        """Invert one byte of the span (fault injection only)."""
        self.region(self.layer).flip_byte()


def _checksum(region: BlockRegion | LayerSpan) -> int:
    if len(region._runs) > 1:
        sums = word_sums.by_id(region._blocks, src_ids=region._index)
        if sums is not None:
            return fold(sums)
    return fold_runs([block_sums(region.run_view(b, n)) for _, b, n in region._runs])


def _copy_fast(dst: BlockRegion | LayerSpan, src: BlockRegion | LayerSpan) -> bool:
    """Copy `src` into `dst` (same shape) by block id in one native call, or one copy
    per run of blocks (consecutive on both sides) when runs are long; False when
    neither applies and the caller moves the bytes by index."""
    pairs = _paired_runs(src.block_ids, dst.block_ids)
    if len(pairs) > 1 and _copy_by_id(dst, src) is not None:
        return True
    if not _long_runs(len(pairs), dst.nbytes):
        return False
    for s, d, n in pairs:
        dst.run_view(d, n).copy_(src.run_view(s, n))
    return True


def _copy_by_id(dst: BlockRegion | LayerSpan, src: BlockRegion | LayerSpan) -> int | None:
    """Copy `src` into `dst` (same shape) block by block, summing as it goes, in one
    native call; the checksum, or None without the kernel."""
    sums = word_sums.by_id(src._blocks, dst._blocks, src._index, dst._index)
    return None if sums is None else fold(sums)


def region_of(
    cache: torch.Tensor,
    layers: range,
    head_start: int,
    head_stop: int,
    block_ids: tuple[int, ...],
) -> BlockRegion | LayerSpan:
    """The source or destination of one DATA message: one layer's region, or a span."""
    if len(layers) == 1:
        return BlockRegion(cache, layers.start, head_start, head_stop, block_ids)
    return LayerSpan(cache, layers.start, len(layers), head_start, head_stop, block_ids)


def gather_checksummed(src: BlockRegion | LayerSpan, out: torch.Tensor) -> int:
    """Gather `src` into `out` (its contiguous shape) and return its checksum, reading
    the source once: in one native call for blocks in several runs; without the
    kernel, once per run where runs are long (else gather, then sum)."""
    _check_payload(out, src.shape, src.dtype, "source")
    if len(src._runs) > 1:
        by_id = word_sums.by_id(src._blocks, out, src_ids=src._index)
        if by_id is not None:
            return fold(by_id)
    if not _long_runs(len(src._runs), src.nbytes, gather=True):
        return checksum(src.gather(out=out))
    block_dim = out.dim() - 4  # [2, n, ...] or [layers, 2, n, ...]
    sums = [
        block_sums(src.run_view(block, n), copy_to=out.narrow(block_dim, pos, n))
        for pos, block, n in src._runs
    ]
    return fold_runs(sums)


def scatter_checksummed(dst: BlockRegion | LayerSpan, payload: torch.Tensor) -> int:
    """Write a contiguous payload (`dst`'s shape) into `dst` and return the payload's
    checksum, reading the payload once: in one native call for blocks in several runs;
    without the kernel, once per run where runs are long (else it sums, then
    scatters)."""
    _check_payload(payload, dst.shape, dst.dtype, "destination")
    if len(dst._runs) > 1:
        by_id = word_sums.by_id(payload, dst._blocks, dst_ids=dst._index)
        if by_id is not None:
            return fold(by_id)
    if not _long_runs(len(dst._runs), dst.nbytes):
        value = checksum(payload)
        dst.scatter(payload)
        return value
    block_dim = payload.dim() - 4  # [2, n, ...] or [layers, 2, n, ...]
    sums = [
        block_sums(payload.narrow(block_dim, pos, n), copy_to=dst.run_view(block, n))
        for pos, block, n in dst._runs
    ]
    return fold_runs(sums)


def copy_into(
    dst: BlockRegion | LayerSpan, src: BlockRegion | LayerSpan, checksum: bool = False
) -> int | None:
    """Copy a region into a region, or a span into a span of as many layers. With
    `checksum`, returns src's checksum, taken in the same pass as the copy: in one
    native call for blocks in several runs; without the kernel, one run of blocks
    (consecutive on both sides) at a time where runs are long."""
    spans = isinstance(dst, LayerSpan) and isinstance(src, LayerSpan)
    if not spans and not (isinstance(dst, BlockRegion) and isinstance(src, BlockRegion)):
        raise ValueError(f"cannot copy a {type(src).__name__} into a {type(dst).__name__}")
    if src.shape != dst.shape or src.dtype != dst.dtype:
        raise ValueError(f"{src.shape} {src.dtype} does not fit {dst.shape} {dst.dtype}")
    if not checksum:
        if spans:
            cast(LayerSpan, dst).copy_from(cast(LayerSpan, src))
        else:
            cast(BlockRegion, dst).copy_from(cast(BlockRegion, src))
        return None
    pairs = _paired_runs(src.block_ids, dst.block_ids)
    if len(pairs) > 1:
        value = _copy_by_id(dst, src)
        if value is not None:
            return value
    if _long_runs(len(pairs), dst.nbytes):
        sums = [block_sums(src.run_view(s, n), copy_to=dst.run_view(d, n)) for s, d, n in pairs]
        return fold_runs(sums)
    # Short runs: gather by index and sum the gathered copy while it is in cache.
    payload = torch.empty(src.shape, dtype=src.dtype, device=src.cache.device)
    value = gather_checksummed(src, payload)
    dst.scatter(payload)
    return value
