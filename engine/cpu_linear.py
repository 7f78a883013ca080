"""Linear layers with their weights packed once, at load, for the CPU's matmul kernels.

On the CPU, `F.linear` multiplies by a plain row-major weight, which the BLAS re-packs
internally on every call. For the skinny matmuls of decode (a few rows against a
large weight) that dominates: SmolLM2's decode step reads its weights at about a
third of the memory bandwidth. Each weight is therefore packed once, and only the
packed copy is kept:
- `NativeLinear` (fp32): the engine's own kernel (`engine/csrc/cpu_matmul.c`), whose
  layout streams each block of output columns front to back; decode reads weights
  near the memory bandwidth, and large batches run at about oneDNN's speed.
- `OneDnnLinear` (bf16, or fp32 where the kernels can't be built): oneDNN's blocked
  layout.

Same math in fp32; the summation order differs from MKL's, as between any two BLAS
builds. `pack_linears` applies a backend from outside the model, after loading and
sharding; CUDA models keep `nn.Linear`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from engine.config import CpuLinearKind
from engine.cpu_kernels import CpuKernels, load_kernels

log = logging.getLogger(__name__)

# The batch size oneDNN tunes the packed layout for; any row count works.
_PACK_HINT_ROWS = 32


def onednn_available(dtype: torch.dtype) -> bool:
    if not torch.backends.mkldnn.is_available():  # type: ignore[no-untyped-call]
        return False
    if dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return dtype == torch.float32


class PackedLinear(nn.Module):
    """An inference-only `nn.Linear` whose weight lives in a kernel's packed layout."""

    in_features: int
    out_features: int
    bias: torch.Tensor | None
    weight_nbytes: int  # what a call reads, as the plain weight would be

    def _take(self, linear: nn.Linear) -> torch.Tensor:
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()
        self.bias = None if linear.bias is None else linear.bias.detach().contiguous()
        self.weight_nbytes = w.nbytes
        return w

    @property
    def nbytes(self) -> int:
        return self.weight_nbytes + (self.bias.nbytes if self.bias is not None else 0)


class OneDnnLinear(PackedLinear):
    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self._take(linear), _PACK_HINT_ROWS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        out: torch.Tensor = torch.ops.mkldnn._linear_pointwise(
            x2, self.packed, self.bias, "none", [], ""
        )
        return out.reshape(*lead, self.out_features)


class NativeLinear(PackedLinear):
    def __init__(self, linear: nn.Linear, kernels: CpuKernels) -> None:
        super().__init__()
        self.kernels = kernels
        self.packed = kernels.pack(self._take(linear))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.stride(-1) != 1:
            x2 = x2.contiguous()
        out = self.kernels.linear(x2, self.packed, self.bias, self.out_features)
        return out.reshape(*lead, self.out_features)


def pack_linears(model: nn.Module, dtype: torch.dtype, kind: CpuLinearKind) -> str:
    """Replace every `nn.Linear` of `model` (a CPU model) by a packed one; returns the
    backend used ("plain" when none applies). Tied weights (an LM head sharing the
    embedding) get a packed copy. "native" fails if the kernels can't be built;
    "auto" falls back from native to oneDNN to plain, with a warning."""
    backend = _choose(dtype, kind)
    if backend == "plain":
        return backend
    kernels = load_kernels() if backend == "native" else None
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                packed = OneDnnLinear(child) if kernels is None else NativeLinear(child, kernels)
                setattr(parent, name, packed)
                count += 1
    log.debug("packed %d linear layers for the CPU (%s)", count, backend)
    return backend


def _choose(dtype: torch.dtype, kind: CpuLinearKind) -> str:
    if kind == "plain":
        return kind
    if kind in ("auto", "native") and dtype == torch.float32:
        if load_kernels() is not None:
            return "native"
        if kind == "native":
            raise RuntimeError("cpu_linear='native': the CPU kernels could not be built (see log)")
    elif kind == "native":
        raise ValueError(f"cpu_linear='native' needs float32 weights, got {dtype}")
    if onednn_available(dtype):
        return "onednn"
    if kind == "onednn":
        raise RuntimeError(f"cpu_linear='onednn': oneDNN can't run {dtype} on this build")
    log.warning("no packed CPU matmul for %s: using plain F.linear", dtype)
    return "plain"
