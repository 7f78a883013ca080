"""Linear layers with their weights prepacked for the CPU's matmul kernels.

On the CPU, `F.linear` multiplies by a plain row-major weight, which the BLAS re-packs
internally on every call. For the skinny matmuls of decode (a few rows against a
large weight) that re-packing dominates: SmolLM2's decode step reads its weights at
about a third of the memory bandwidth. oneDNN can pack each weight once, in the
blocked layout its kernels read, and `PackedLinear` keeps only that packed copy.
Same math in fp32 (the summation order differs from MKL's, as between any two BLAS
builds). `pack_linears` applies it from outside the model, after loading and
sharding; CUDA models and builds without oneDNN keep `nn.Linear`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

log = logging.getLogger(__name__)

# The batch size oneDNN tunes the packed layout for; any row count works.
_PACK_HINT_ROWS = 32


def packing_available(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """`nn.Linear` with its weight packed by oneDNN; inference only."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, _PACK_HINT_ROWS)
        self.bias = None if linear.bias is None else linear.bias.detach()
        self.weight_nbytes = w.nbytes  # what a call reads, as the plain weight would be

    @property
    def nbytes(self) -> int:
        return self.weight_nbytes + (self.bias.nbytes if self.bias is not None else 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x2, self.packed, self.bias, "none", [], ""
        )
        return out.reshape(*lead, self.out_features)


def pack_linears(model: nn.Module) -> int:
    """Replace every `nn.Linear` in `model` (a CPU model) by a `PackedLinear`; returns
    how many. Tied weights (an LM head sharing the embedding) get a packed copy."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, PackedLinear(child))
                count += 1
    log.debug("packed %d linear layers for the CPU", count)
    return count
