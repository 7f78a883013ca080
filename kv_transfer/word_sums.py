"""The checksum of KV payloads and block regions: weighted word sums per block.

A tensor laid out `[..., 2, n, slot, head, dim]` (K/V, then blocks) is summed as 64-bit
(or narrower) words per (K/V, block), wrapping; `fold` weights each sum by its position
and adds them up. It costs one read pass at memory bandwidth, catches any changed word
and any misplaced block, and gives the same value for a region and for its gathered
copy, since both list the same blocks in the same order. It is an integrity check, not
a MAC.

On the CPU the engine's native kernel sums, or copies and sums in the same pass, in one
call, picking blocks by id on either side (`by_id`); elsewhere (CUDA) torch ops do it.
"""

from __future__ import annotations

import functools

import torch

from engine.cpu_kernels import load_kernels

_MASK64 = (1 << 64) - 1


def _words(t: torch.Tensor) -> torch.Tensor:
    """`t` reinterpreted as the widest integer words its last dim allows (a view)."""
    row = t.shape[-1] * t.element_size()
    for dtype, size in ((torch.int64, 8), (torch.int32, 4), (torch.int16, 2)):
        if row % size == 0:
            return t.view(dtype)
    return t.view(torch.uint8)


def by_id(
    src: torch.Tensor,
    copy_to: torch.Tensor | None = None,
    src_ids: torch.Tensor | None = None,
    dst_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """[..., 2, n] word sums of the blocks `src_ids` of src (all its blocks without
    ids), each copied to block `dst_ids[i]` (or i) of `copy_to` in the same pass, by the
    native kernel: one call, however scattered the blocks. None without the kernel (not
    on the CPU, or a layout it doesn't take)."""
    kernels = load_kernels() if src.device.type == "cpu" else None
    return None if kernels is None else kernels.word_sums(src, copy_to, src_ids, dst_ids)


def block_sums(t: torch.Tensor, copy_to: torch.Tensor | None = None) -> torch.Tensor:
    """[..., 2, n] int64 word sums of a [..., 2, n, slot, head, dim] tensor (wrapping).

    With `copy_to`, t is also copied there. On the CPU, the engine's native kernel
    does both in one read of t where the layout allows; torch ops otherwise.
    """
    sums = by_id(t, copy_to)
    if sums is not None:
        return sums
    sums = _words(t).sum(dim=(-3, -2, -1), dtype=torch.int64)
    if copy_to is not None:
        copy_to.copy_(t)
    return sums


@functools.lru_cache(maxsize=64)
def _weights(n: int, device: torch.device) -> torch.Tensor:
    return torch.arange(1, 2 * n, 2, dtype=torch.int64, device=device)


def fold(sums: torch.Tensor) -> int:
    """The checksum from word sums `[..., 2, n]`, in block order."""
    flat = sums.reshape(-1)
    weights = _weights(flat.numel(), flat.device)
    # Both wrap modulo 2**64; CUDA has no integer dot.
    folded = (flat * weights).sum() if flat.is_cuda else torch.dot(flat, weights)
    return int(folded) & _MASK64


def fold_runs(sums: list[torch.Tensor]) -> int:
    """The checksum from per-run sums `[..., 2, k]`, in block order."""
    return fold(torch.cat(sums, dim=-1) if len(sums) > 1 else sums[0])


def checksum(payload: torch.Tensor) -> int:
    """Checksum of a [2, n, slot, head, dim] tensor; equals its source region's."""
    return fold(block_sums(payload))
