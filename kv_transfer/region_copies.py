"""Copies of block regions that checksum what they move in the same pass.

A sender gathers a source region into a staging payload and sums it as it reads
(`gather_checksummed`), a receiver sums a staged payload as it scatters it into the
destination (`scatter_checksummed`), and same-host transports copy region to region
(`copy_into`). Each reads its source once: in one native call for blocks in several
runs; without the kernel, one run at a time where runs are long, else by index.
"""

from __future__ import annotations

from typing import cast

import torch

from kv_transfer import word_sums
from kv_transfer.block_runs import long_runs, paired_runs
from kv_transfer.regions import BlockRegion, LayerSpan, check_payload, copy_by_id
from kv_transfer.word_sums import block_sums, checksum, fold, fold_runs


def gather_checksummed(src: BlockRegion | LayerSpan, out: torch.Tensor) -> int:
    """Gather `src` into `out` (its contiguous shape) and return its checksum, reading
    the source once: in one native call for blocks in several runs; without the
    kernel, once per run where runs are long (else gather, then sum)."""
    check_payload(out, src.shape, src.dtype, "source")
    if len(src.block_runs) > 1:
        by_id = word_sums.by_id(src.all_blocks, out, src_ids=src.block_index)
        if by_id is not None:
            return fold(by_id)
    if not long_runs(len(src.block_runs), src.nbytes, gather=True):
        return checksum(src.gather(out=out))
    block_dim = out.dim() - 4  # [2, n, ...] or [layers, 2, n, ...]
    sums = [
        block_sums(src.run_view(block, n), copy_to=out.narrow(block_dim, pos, n))
        for pos, block, n in src.block_runs
    ]
    return fold_runs(sums)


def scatter_checksummed(dst: BlockRegion | LayerSpan, payload: torch.Tensor) -> int:
    """Write a contiguous payload (`dst`'s shape) into `dst` and return the payload's
    checksum, reading the payload once: in one native call for blocks in several runs;
    without the kernel, once per run where runs are long (else it sums, then
    scatters)."""
    check_payload(payload, dst.shape, dst.dtype, "destination")
    if len(dst.block_runs) > 1:
        by_id = word_sums.by_id(payload, dst.all_blocks, dst_ids=dst.block_index)
        if by_id is not None:
            return fold(by_id)
    if not long_runs(len(dst.block_runs), dst.nbytes):
        value = checksum(payload)
        dst.scatter(payload)
        return value
    block_dim = payload.dim() - 4  # [2, n, ...] or [layers, 2, n, ...]
    sums = [
        block_sums(payload.narrow(block_dim, pos, n), copy_to=dst.run_view(block, n))
        for pos, block, n in dst.block_runs
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
    pairs = paired_runs(src.block_ids, dst.block_ids)
    if len(pairs) > 1:
        value = copy_by_id(dst, src)
        if value is not None:
            return value
    if long_runs(len(pairs), dst.nbytes):
        sums = [block_sums(src.run_view(s, n), copy_to=dst.run_view(d, n)) for s, d, n in pairs]
        return fold_runs(sums)
    # Short runs: gather by index and sum the gathered copy while it is in cache.
    payload = torch.empty(src.shape, dtype=src.dtype, device=src.cache.device)
    value = gather_checksummed(src, payload)
    dst.scatter(payload)
    return value
