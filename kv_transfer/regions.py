"""Block regions of a paged KV cache, and the copies and checksums over them.

A `BlockRegion` names one layer's K and V for a range of local KV heads over a list of
blocks of a cache tensor `[layer, kv, block, slot, head, dim]` (engine/kv_cache.py).
Its contiguous form, the payload of a DATA message, has shape
`[2, num_blocks, block_size, num_heads, head_dim]`.

Copies read runs of consecutive block ids as plain strided views, so a region of
contiguous blocks moves with one copy per run. Blocks in short runs move, and are
summed, by id: on the CPU with one call of the engine's native kernel for a whole
region or span (`word_sums.by_id`), elsewhere with index_select/index_copy_. A region's
checksum (kv_transfer.word_sums) equals its gathered payload's. Copies that checksum in
the same pass live in kv_transfer/region_copies.py; runs in kv_transfer/block_runs.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch

from kv_transfer import word_sums
from kv_transfer.block_runs import consecutive, long_runs, paired_runs, runs
from kv_transfer.word_sums import block_sums, fold, fold_runs


def check_payload(
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
    def all_blocks(self) -> torch.Tensor:
        """Every block of the cache, with the region's layer and heads (`_index` picks)."""
        return self._layer

    @property
    def dense(self) -> bool:
        """One run of blocks with all the cache's heads: K and V are each contiguous."""
        all_heads = self.head_start == 0 and self.head_stop == self.cache.shape[4]
        return len(self.block_runs) == 1 and all_heads

    @cached_property
    def block_runs(self) -> list[tuple[int, int, int]]:
        return runs(self.block_ids)

    @cached_property
    def block_index(self) -> torch.Tensor:
        return torch.tensor(self.block_ids, dtype=torch.long, device=self.cache.device)

    def run_view(self, first_block: int, length: int) -> torch.Tensor:
        """A strided view of blocks `first_block ... first_block + length - 1`."""
        return self._layer[:, first_block : first_block + length]

    @cached_property
    def _view(self) -> torch.Tensor | None:
        """[2, n, slot, head, dim] as one strided view, over one run of blocks."""
        block_runs = self.block_runs
        return self.run_view(block_runs[0][1], block_runs[0][2]) if len(block_runs) == 1 else None

    def gather(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """The region's contiguous copy (into `out` when given)."""
        view = self._view
        if view is not None:
            if out is None:
                return view.clone(memory_format=torch.contiguous_format)
            return out.copy_(view)
        if out is None:
            return torch.index_select(self._layer, 1, self.block_index)
        return torch.index_select(self._layer, 1, self.block_index, out=out)

    def scatter(self, payload: torch.Tensor) -> None:
        """Write a contiguous [2, n, slot, head, dim] payload into the region."""
        check_payload(payload, self.shape, self.dtype, "region")
        block_runs = self.block_runs
        if long_runs(len(block_runs), self.nbytes):
            for pos, block, n in block_runs:
                self.run_view(block, n).copy_(payload[:, pos : pos + n])
        else:
            self._layer.index_copy_(1, self.block_index, payload)

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
    def block_runs(self) -> list[tuple[int, int, int]]:
        return runs(self.block_ids)

    @cached_property
    def block_index(self) -> torch.Tensor:
        return torch.tensor(self.block_ids, dtype=torch.long, device=self.cache.device)

    @cached_property
    def all_blocks(self) -> torch.Tensor:
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
        if not consecutive(ids):
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
        if word_sums.by_id(self.all_blocks, out, src_ids=self.block_index) is not None:
            return out
        for i, region in enumerate(self.regions):
            region.gather(out=out[i])
        return out

    def scatter(self, payload: torch.Tensor) -> None:
        """Write a contiguous [layers, 2, n, slot, head, dim] payload into the span."""
        check_payload(payload, self.shape, self.dtype, "span")
        if (
            len(self.block_runs) > 1
            and word_sums.by_id(payload, self.all_blocks, dst_ids=self.block_index) is not None
        ):
            return
        if long_runs(len(self.block_runs), self.nbytes):
            for pos, block, n in self.block_runs:
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
    if len(region.block_runs) > 1:
        sums = word_sums.by_id(region.all_blocks, src_ids=region.block_index)
        if sums is not None:
            return fold(sums)
    return fold_runs([block_sums(region.run_view(b, n)) for _, b, n in region.block_runs])


def _copy_fast(dst: BlockRegion | LayerSpan, src: BlockRegion | LayerSpan) -> bool:
    """Copy `src` into `dst` (same shape) by block id in one native call, or one copy
    per run of blocks (consecutive on both sides) when runs are long; False when
    neither applies and the caller moves the bytes by index."""
    pairs = paired_runs(src.block_ids, dst.block_ids)
    if len(pairs) > 1 and copy_by_id(dst, src) is not None:
        return True
    if not long_runs(len(pairs), dst.nbytes):
        return False
    for s, d, n in pairs:
        dst.run_view(d, n).copy_(src.run_view(s, n))
    return True


def copy_by_id(dst: BlockRegion | LayerSpan, src: BlockRegion | LayerSpan) -> int | None:
    """Copy `src` into `dst` (same shape) block by block, summing as it goes, in one
    native call; the checksum, or None without the kernel."""
    sums = word_sums.by_id(src.all_blocks, dst.all_blocks, src.block_index, dst.block_index)
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
