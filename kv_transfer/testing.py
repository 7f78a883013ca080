"""Helpers for tests and benchmarks of kv_transfer: reference KV and per-rank caches.

A reference tensor holds the whole model's prompt KV, `[layer, kv, prompt block, slot,
head, dim]` with global layer and head indices. Each rank's cache holds its shard of
it at arbitrary block ids; after a transfer, a receiver rank's destination blocks must
equal its shard of the reference bit for bit.
"""

from __future__ import annotations

import torch

from engine.kv_cache import KVCache, KVCacheLayout
from kv_transfer.base import LocalRank
from kv_transfer.mapping import KVGeometry


def rank_layout(
    geo: KVGeometry,
    me: LocalRank,
    head_dim: int,
    block_size: int,
    num_blocks: int,
    dtype: torch.dtype,
) -> KVCacheLayout:
    """The cache layout of one rank: its own layers and KV heads only."""
    return KVCacheLayout(
        len(geo.layers(me.parallel, me.pp_rank)),
        len(geo.heads(me.parallel, me.tp_rank)),
        head_dim,
        block_size,
        num_blocks,
        dtype,
    )


def reference_kv(
    geo: KVGeometry,
    head_dim: int,
    block_size: int,
    num_prompt_blocks: int,
    dtype: torch.dtype,
    seed: int = 0,
) -> torch.Tensor:
    """Deterministic random prompt KV for the whole model."""
    gen = torch.Generator().manual_seed(seed)
    shape = (geo.num_layers, 2, num_prompt_blocks, block_size, geo.num_kv_heads, head_dim)
    return torch.randn(shape, generator=gen).to(dtype)


def shard(ref: torch.Tensor, geo: KVGeometry, me: LocalRank) -> torch.Tensor:
    """The part of `ref` that rank `me` owns: its layers and heads."""
    layers = geo.layers(me.parallel, me.pp_rank)
    heads = geo.heads(me.parallel, me.tp_rank)
    return ref[layers.start : layers.stop, :, :, :, heads.start : heads.stop]


def fill(
    cache: KVCache, ref: torch.Tensor, geo: KVGeometry, me: LocalRank, block_ids: list[int]
) -> None:
    """Write rank `me`'s shard of prompt blocks 0.. into `block_ids` of its cache."""
    device = cache.tensor.device
    index = torch.tensor(block_ids, dtype=torch.long, device=device)
    cache.tensor.index_copy_(2, index, shard(ref, geo, me)[:, :, : len(block_ids)].to(device))


def read(cache: KVCache, block_ids: list[int]) -> torch.Tensor:
    """`block_ids` of every layer, in order, on the CPU: compare with `shard(ref, ...)`."""
    index = torch.tensor(block_ids, dtype=torch.long, device=cache.tensor.device)
    return cache.tensor[:, :, index].cpu()
