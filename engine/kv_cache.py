"""The paged KV cache tensor and its layout.

One contiguous tensor holds every layer's keys and values:

    cache[layer, kv, block, slot, head, dim]
          kv: 0 = keys, 1 = values; slot: position within the block

so that a (layer range x KV-head range x block list) slice, the unit that
kv_transfer moves, is a plain index into it. The tensor can live on any device, or
on caller-provided storage (named shared memory for the same-host transport).
A rank of a tensor-parallel group holds only its own KV heads.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from engine.config import ModelConfig


@dataclass(frozen=True)
class KVCacheLayout:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    block_size: int
    num_blocks: int
    dtype: torch.dtype

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size", "num_blocks"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        return (
            self.num_layers,
            2,
            self.num_blocks,
            self.block_size,
            self.num_kv_heads,
            self.head_dim,
        )

    @property
    def block_bytes(self) -> int:
        """Bytes one block occupies across all layers, keys and values."""
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def total_bytes(self) -> int:
        return self.block_bytes * self.num_blocks

    @classmethod
    def from_budget(
        cls,
        model: ModelConfig,
        block_size: int,
        kv_cache_bytes: int,
        dtype: torch.dtype,
        num_layers: int | None = None,
        num_kv_heads: int | None = None,
    ) -> KVCacheLayout:
        """The largest cache that fits `kv_cache_bytes`.

        `num_layers` and `num_kv_heads` default to the whole model; a TP/PP rank
        passes its own share.
        """
        probe = cls(
            num_layers or model.num_layers,
            num_kv_heads or model.num_kv_heads,
            model.head_dim,
            block_size,
            1,
            dtype,
        )
        num_blocks = kv_cache_bytes // probe.block_bytes
        if num_blocks < 1:
            raise ValueError(
                f"kv_cache_bytes ({kv_cache_bytes}) is smaller than one block "
                f"({probe.block_bytes} bytes)"
            )
        return cls(
            probe.num_layers, probe.num_kv_heads, model.head_dim, block_size, num_blocks, dtype
        )


class KVCache:
    """The cache tensor of one engine (or one TP/PP rank)."""

    def __init__(
        self,
        layout: KVCacheLayout,
        device: torch.device | str = "cpu",
        storage: torch.Tensor | None = None,
    ) -> None:
        self.layout = layout
        if storage is None:
            self.tensor = torch.zeros(layout.shape, dtype=layout.dtype, device=device)
        else:
            need = layout.total_bytes
            if storage.numel() * storage.element_size() < need:
                raise ValueError(f"storage holds fewer than the {need} bytes the cache needs")
            flat = storage.view(torch.uint8).reshape(-1)[:need]
            self.tensor = flat.view(layout.dtype).view(layout.shape)

    def keys(self, layer: int) -> torch.Tensor:
        """[num_blocks, block_size, kv_heads, head_dim] keys of one layer (a view)."""
        return self.tensor[layer, 0]

    def values(self, layer: int) -> torch.Tensor:
        return self.tensor[layer, 1]
