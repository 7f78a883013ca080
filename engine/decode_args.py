"""The fused decode kernel's arguments (`pd_decode_layer` in engine/csrc), built once.

A `DecodeLayer` packs one decoder layer's weights and shapes into the C struct the
kernel reads, once at load; a `DecodeStep` packs what every layer of one decode step
shares (positions, slots, block tables, RoPE tables, scratch). Each holds the tensors
its pointers name alive for as long as it lives. `CpuKernels.decode_step` builds steps.
"""

from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


class LayerArgs(ctypes.Structure):
    """`pd_layer` (csrc/cpu_decode_layer.c): one layer's weights and shapes."""

    _fields_ = [
        ("input_norm", _ptr),
        ("qkv", _ptr),
        ("qkv_bias", _ptr),
        ("o", _ptr),
        ("post_norm", _ptr),
        ("gate_up", _ptr),
        ("down", _ptr),
        ("hidden", _i64),
        ("q_heads", _i64),
        ("kv_heads", _i64),
        ("head_dim", _i64),
        ("intermediate", _i64),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


class StepArgs(ctypes.Structure):
    """`pd_step`: what every layer of one decode step shares."""

    _fields_ = [
        ("tokens", _i64),
        ("block_size", _i64),
        ("table_stride", _i64),
        ("positions", _ptr),
        ("slots", _ptr),
        ("tables", _ptr),
        ("lens", _ptr),
        ("cos", _ptr),
        ("sin", _ptr),
        ("scratch", _ptr),
        ("threads", ctypes.c_int),
    ]


@dataclass(frozen=True)
class LayerWeights:
    """One decoder layer as the fused decode kernel reads it: packed matmul weights
    (`CpuKernels.pack`), norm weights and shapes, all fp32 on the CPU."""

    input_norm: torch.Tensor
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    o: torch.Tensor
    post_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor
    hidden: int
    q_heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    eps: float
    scale: float


class DecodeLayer:
    """A layer's arguments, built once; holds its tensors alive."""

    def __init__(self, w: LayerWeights) -> None:
        for t in (w.input_norm, w.post_norm, w.qkv_bias):
            if t is not None and (t.dtype != torch.float32 or not t.is_contiguous()):
                raise ValueError("decode layer norms and bias must be contiguous fp32")
        self.weights = w
        self.args = LayerArgs(
            w.input_norm.data_ptr(),
            w.qkv.data_ptr(),
            None if w.qkv_bias is None else w.qkv_bias.data_ptr(),
            w.o.data_ptr(),
            w.post_norm.data_ptr(),
            w.gate_up.data_ptr(),
            w.down.data_ptr(),
            w.hidden,
            w.q_heads,
            w.kv_heads,
            w.head_dim,
            w.intermediate,
            w.eps,
            w.scale,
        )


class DecodeStep:
    """One decode-only step's shared arguments and scratch; holds its tensors alive."""

    def __init__(self, args: StepArgs, keep: tuple[torch.Tensor, ...]) -> None:
        self.args = args
        self._keep = keep
