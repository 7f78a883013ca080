"""Attention over the paged KV cache.

A step's tokens arrive packed, with no padding: decode tokens first (one per
sequence), then each prefill chunk. Every layer writes the step's new K/V into the
cache through `slot_mapping`, then attends:
- decode tokens in one batched call over their gathered block tables;
- each prefill chunk on its own, over its cached prefix plus itself (causal).

`AttentionMetadata` is built once per step and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.cpu_kernels import CpuKernels


@dataclass(frozen=True)
class PrefillSpan:
    start: int  # offset of the chunk's first token in the packed batch
    length: int  # tokens in the chunk
    context_len: int  # tokens already in the cache before this chunk
    block_table: torch.Tensor  # [n_blocks] long, covering context_len + length


@dataclass(frozen=True)
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] long: flat cache slot of each new token
    num_decodes: int
    decode_block_tables: torch.Tensor | None  # [num_decodes, max_blocks] long
    decode_mask: torch.Tensor | None  # [num_decodes, 1, 1, max_blocks*block_size] bool
    decode_context_lens: torch.Tensor | None  # [num_decodes] long, the new token included
    prefills: tuple[PrefillSpan, ...]


def write_kv(
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store new keys/values [T, kv_heads, dim] into cache slots."""
    kv_heads, dim = k.shape[1], k.shape[2]
    k_cache.view(-1, kv_heads, dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, dim).index_copy_(0, slot_mapping, v)


def paged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    kernels: CpuKernels | None = None,
) -> torch.Tensor:
    """q [T, heads, dim], k/v [T, kv_heads, dim] -> [T, heads, dim].

    k/v are this step's new keys and values; they must already be in the cache.
    With `kernels` (fp32 on the CPU), decode tokens read the cache in place.
    """
    out = torch.empty_like(q)
    nd = meta.num_decodes
    if nd and kernels is not None:
        assert meta.decode_block_tables is not None and meta.decode_context_lens is not None
        kernels.decode_attention(
            q[:nd],
            k_cache,
            v_cache,
            meta.decode_block_tables,
            meta.decode_context_lens,
            scale,
            out[:nd],
        )
    elif nd:
        assert meta.decode_block_tables is not None
        out[:nd] = _decode(
            q[:nd], k_cache, v_cache, meta.decode_block_tables, meta.decode_mask, scale
        )
    for span in meta.prefills:
        s, e = span.start, span.start + span.length
        out[s:e] = _prefill(q[s:e], k[s:e], v[s:e], k_cache, v_cache, span, scale)
    return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """[..., n_blocks] block ids -> [..., n_blocks * block_size, kv_heads, dim]."""
    g = cache.index_select(0, block_table.reshape(-1))
    return g.view(*block_table.shape[:-1], -1, *cache.shape[2:])


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    keys = _gather(k_cache, block_tables).transpose(1, 2)  # [B, kv_heads, L, dim]
    vals = _gather(v_cache, block_tables).transpose(1, 2)
    o = F.scaled_dot_product_attention(
        q.unsqueeze(2),
        keys,
        vals,
        attn_mask=mask,
        scale=scale,
        enable_gqa=q.shape[1] != keys.shape[1],
    )  # [B, heads, 1, dim]
    return o.squeeze(2)


def _prefill(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    span: PrefillSpan,
    scale: float,
) -> torch.Tensor:
    gqa = q.shape[1] != k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, heads, n, dim]
    if span.context_len == 0:
        keys, vals, mask, causal = k, v, None, True
    else:
        total = span.context_len + span.length
        keys = _gather(k_cache, span.block_table)[:total]
        vals = _gather(v_cache, span.block_table)[:total]
        # Query i sits at position context_len + i and sees keys 0..context_len + i.
        qpos = torch.arange(span.length, device=q.device) + span.context_len
        mask = torch.arange(total, device=q.device)[None, :] <= qpos[:, None]
        causal = False
    o = F.scaled_dot_product_attention(
        qh,
        keys.transpose(0, 1).unsqueeze(0),
        vals.transpose(0, 1).unsqueeze(0),
        attn_mask=mask,
        is_causal=causal,
        scale=scale,
        enable_gqa=gqa,
    )
    return o.squeeze(0).transpose(0, 1)
