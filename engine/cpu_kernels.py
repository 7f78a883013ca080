"""The engine's native CPU kernels (`engine/csrc/*.c`): typed entry points.

`engine/kernel_build.py` compiles the library on first use and caches it; it links
OpenMP by its soname and is loaded after torch, so it shares torch's OpenMP runtime and
threads.

`load_kernels()` returns None, with the reason logged once, when there is no compiler
or the build fails; callers fall back to another matmul and say so. The fused decode
layer's argument structs live in engine/decode_args.py.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.decode_args import DecodeLayer, DecodeStep, LayerArgs, StepArgs
from engine.kernel_build import KernelBuildError, build_library

log = logging.getLogger(__name__)

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


class CpuKernels:
    """Typed entry points into the loaded library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        layer, step = ctypes.POINTER(LayerArgs), ctypes.POINTER(StepArgs)
        f32, i32 = ctypes.c_float, ctypes.c_int
        self._linear = self._bind("pd_linear", None, _ptr, _i64, _ptr, _ptr, _ptr, *[_i64] * 4, i32)
        self._rms_norm = self._bind(
            "pd_rms_norm", None, _ptr, _i64, _ptr, _ptr, _i64, _i64, f32, i32
        )
        self._silu_mul = self._bind("pd_silu_mul", None, _ptr, _ptr, _i64, _i64, i32)
        self._decode_attention = self._bind(
            "pd_decode_attention", i32, _ptr, _i64, _ptr, _ptr, _ptr, _i64, _ptr, _ptr,
            *[_i64] * 5, f32, i32,
        )  # fmt: skip
        self._decode_scratch_floats = self._bind("pd_decode_scratch_floats", _i64, layer, _i64)
        self._decode_layer = self._bind("pd_decode_layer", i32, layer, step, _ptr, _ptr, _ptr)
        self._word_sums = self._bind("pd_word_sums", None, *[_ptr] * 7, _i64, _ptr, i32)
        self._sums_plans: dict[tuple[Any, ...], _SumsPlan] = {}
        self._pack = self._bind("pd_pack", None, _ptr, _ptr, _i64, _i64)
        self._packed_numel = self._bind("pd_packed_numel", _i64, _i64, _i64)
        self.block_cols = int(self._bind("pd_block_cols", _i64)())
        # The vector unit the matmul tiles were built for: avx512, avx2 or generic.
        self.isa = bytes(self._bind("pd_isa", ctypes.c_char_p)()).decode()
        self.max_attention_heads = int(self._bind("pd_attention_max_heads", _i64)())

    def _bind(self, name: str, restype: Any, *argtypes: Any) -> Any:
        """The library's function `name`, typed."""
        fn = getattr(self._lib, name)
        fn.restype, fn.argtypes = restype, list(argtypes)
        return fn

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A [N, K] fp32 weight in the kernel's column-block layout (a new 1-D tensor)."""
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError(f"pack wants a 2-D fp32 CPU weight, got {weight.dtype} {weight.shape}")
        w = weight.detach().contiguous()
        n, k = w.shape
        packed = torch.empty(int(self._packed_numel(n, k)), dtype=torch.float32)
        if packed.data_ptr() % 64:  # the kernel's aligned vector loads need this
            raise RuntimeError("the CPU allocator returned a buffer not 64-byte aligned")
        self._pack(w.data_ptr(), packed.data_ptr(), n, k)
        return packed

    def linear(
        self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int
    ) -> torch.Tensor:
        """x [M, K] fp32 (rows may be strided) -> [M, n]. No checks: the hot path."""
        m, k = x.shape
        y = torch.empty((m, n), dtype=torch.float32)
        self._linear(
            x.data_ptr(),
            x.stride(0),
            packed.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            n,
            m,
            n,
            k,
            torch.get_num_threads(),
        )
        return y

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """RMSNorm of x [M, H] fp32 (rows may be strided) -> a new [M, H]."""
        if x.stride(-1) != 1:
            x = x.contiguous()
        m, h = x.shape
        y = torch.empty((m, h), dtype=torch.float32)
        self._rms_norm(
            x.data_ptr(),
            x.stride(0),
            weight.data_ptr(),
            y.data_ptr(),
            m,
            h,
            eps,
            torch.get_num_threads(),
        )
        return y

    def silu_mul(self, gate_up: torch.Tensor) -> torch.Tensor:
        """[M, 2I] (gate, then up) -> silu(gate) * up, [M, I]."""
        if not gate_up.is_contiguous():
            gate_up = gate_up.contiguous()
        m, two_i = gate_up.shape
        out = torch.empty((m, two_i // 2), dtype=torch.float32)
        self._silu_mul(gate_up.data_ptr(), out.data_ptr(), m, two_i // 2, torch.get_num_threads())
        return out

    def decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        scale: float,
        out: torch.Tensor,
    ) -> None:
        """One query token per sequence over its paged context, written into `out`.

        q [B, Hq, D] (heads contiguous); caches [blocks, block_size, Hkv, D]
        contiguous; block_tables [B, W] and context_lens [B] int64; out [B, Hq, D]
        contiguous.
        """
        b, hq, d = q.shape
        if q.stride(2) != 1 or q.stride(1) != d:
            q = q.contiguous()
        rc = self._decode_attention(
            q.data_ptr(),
            q.stride(0),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
            block_tables.data_ptr(),
            block_tables.stride(0),
            context_lens.data_ptr(),
            out.data_ptr(),
            b,
            hq,
            k_cache.shape[2],
            d,
            k_cache.shape[1],
            scale,
            torch.get_num_threads(),
        )
        if rc != 0:
            raise RuntimeError(f"decode attention kernel failed ({rc})")

    def decode_step(
        self,
        layer: DecodeLayer,
        positions: torch.Tensor,
        slots: torch.Tensor,
        block_tables: torch.Tensor,
        context_lens: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        block_size: int,
    ) -> DecodeStep:
        """Arguments shared by every layer of a step of `positions.numel()` decode
        tokens (all int64 and contiguous; cos/sin the [positions, head_dim] tables)."""
        tokens = positions.numel()
        floats = int(self._decode_scratch_floats(ctypes.byref(layer.args), tokens))
        scratch = torch.empty(floats, dtype=torch.float32)
        args = StepArgs(
            tokens,
            block_size,
            block_tables.stride(0),
            positions.data_ptr(),
            slots.data_ptr(),
            block_tables.data_ptr(),
            context_lens.data_ptr(),
            cos.data_ptr(),
            sin.data_ptr(),
            scratch.data_ptr(),
            torch.get_num_threads(),
        )
        return DecodeStep(args, (positions, slots, block_tables, context_lens, cos, sin, scratch))

    def decode_layer(
        self,
        layer: DecodeLayer,
        step: DecodeStep,
        hidden: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
    ) -> None:
        """Run `layer` on hidden [tokens, hidden] (contiguous, updated in place),
        storing the step's K/V in the layer's caches."""
        rc = self._decode_layer(
            ctypes.byref(layer.args),
            ctypes.byref(step.args),
            hidden.data_ptr(),
            k_cache.data_ptr(),
            v_cache.data_ptr(),
        )
        if rc != 0:
            raise RuntimeError(f"decode layer kernel failed ({rc})")

    def word_sums(
        self,
        src: torch.Tensor,
        dst: torch.Tensor | None = None,
        src_blocks: torch.Tensor | None = None,
        dst_blocks: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Wrapping int64 sums of the 64-bit words of each `[slot, head, dim]` block of
        src `[..., block, slot, head, dim]` (up to 2 dims before the block dim), copying
        each block into dst in the same pass. `src_blocks` / `dst_blocks` (int64 block
        ids) pick the blocks on either side: the i-th block summed is src[...,
        src_blocks[i], :, :, :], copied to dst[..., dst_blocks[i], :, :, :]; without
        ids, block i. Both sides name as many blocks and agree on every other dim.
        Returns `[..., n]` sums, or None when the layout doesn't fit the kernel: a side
        off the CPU, heads not contiguous within a slot, or rows not whole 64-bit words.

        The checks and arguments that depend only on shapes and strides are worked out
        once per layout (`_SumsPlan`); a call then checks only what can change with the
        same layout: alignment, and the block ids."""
        key = (
            src.shape,
            src.stride(),
            src.dtype,
            src.device.type,
            None if dst is None else (dst.shape, dst.stride(), dst.dtype, dst.device.type),
            None if src_blocks is None else src_blocks.numel(),
            None if dst_blocks is None else dst_blocks.numel(),
        )
        plan = self._sums_plans.get(key)
        if plan is None:
            plan = _SumsPlan.of(src, dst, src_blocks, dst_blocks)
            if len(self._sums_plans) >= 256:
                self._sums_plans.clear()
            self._sums_plans[key] = plan
        if not plan.fits:
            return None
        for v, ids in ((src, src_blocks), (dst, dst_blocks)):
            if v is None or ids is None:
                continue
            if ids.dtype != torch.int64 or ids.device.type != "cpu" or not ids.is_contiguous():
                raise ValueError("block ids must be a contiguous int64 CPU tensor")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= v.shape[-4]):
                raise IndexError(f"block ids outside [0, {v.shape[-4]})")
        if src.data_ptr() % 8 or (dst is not None and dst.data_ptr() % 8):
            return None
        sums = torch.empty(plan.sums_shape, dtype=torch.int64)
        self._word_sums(
            src.data_ptr(),
            plan.src_strides,
            None if src_blocks is None else src_blocks.data_ptr(),
            None if dst is None else dst.data_ptr(),
            plan.dst_strides,
            None if dst_blocks is None else dst_blocks.data_ptr(),
            plan.dims,
            plan.run_bytes,
            sums.data_ptr(),
            torch.get_num_threads(),
        )
        return sums


@dataclass(frozen=True)
class _SumsPlan:
    """`word_sums` arguments for one layout of src and dst (shapes, strides, dtype)."""

    fits: bool
    dims: Any = None  # ctypes int64[4]
    src_strides: Any = None
    dst_strides: Any = None
    run_bytes: int = 0
    sums_shape: tuple[int, ...] = ()

    @classmethod
    def of(
        cls,
        src: torch.Tensor,
        dst: torch.Tensor | None,
        src_blocks: torch.Tensor | None,
        dst_blocks: torch.Tensor | None,
    ) -> _SumsPlan:
        """The plan, or one that doesn't fit; ValueError if the sides disagree."""
        lead = src.shape[:-3]
        on_cpu = src.device.type == "cpu" and (dst is None or dst.device.type == "cpu")
        if not 1 <= len(lead) <= 3 or not on_cpu:
            return cls(False)
        n = src.shape[-4] if src_blocks is None else src_blocks.numel()
        sides = [(src, src_blocks)] if dst is None else [(src, src_blocks), (dst, dst_blocks)]
        for v, ids in sides:
            count = v.shape[-4] if ids is None else ids.numel()
            if v.dtype != src.dtype or v.shape[:-4] != src.shape[:-4] or count != n:
                raise ValueError(f"{tuple(v.shape)} with {count} blocks does not match src")
            if v.shape[-3:] != src.shape[-3:]:
                raise ValueError(f"blocks of {tuple(v.shape[-3:])} and {tuple(src.shape[-3:])}")
        heads, dim, elem = src.shape[-2], src.shape[-1], src.element_size()
        if (dim * elem) % 8:
            return cls(False)
        for v, _ in sides:
            if v.stride(-1) != 1 or (heads > 1 and v.stride(-2) != dim):
                return cls(False)
            if any((st * elem) % 8 for st in v.stride()[:-2]):
                return cls(False)
        pad = [0] * (3 - len(lead))  # absent group dims: size 1, stride 0

        def strides(v: torch.Tensor) -> ctypes.Array[ctypes.c_int64]:
            return (_i64 * 4)(*pad, *(x * elem for x in v.stride()[: len(lead) + 1]))

        src_strides = strides(src)
        return cls(
            True,
            (_i64 * 4)(*[1] * len(pad), *lead[:-1], n, src.shape[-3]),
            src_strides,
            src_strides if dst is None else strides(dst),
            heads * dim * elem,
            (*lead[:-1], n),
        )


@functools.cache
def load_kernels() -> CpuKernels | None:
    """The kernels for this host, or None (logged once) when they can't be built."""
    try:
        return CpuKernels(build_library())
    except (KernelBuildError, OSError) as e:
        log.warning("native CPU kernels unavailable, falling back: %s", e)
        return None
