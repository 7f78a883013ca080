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

Which is fastest depends on the CPU and on the row count, so with `cpu_linear="auto"`
each class of row counts (one row, a decode batch, a prefill chunk) gets the path that
measured fastest on the model's own shapes (`engine/linear_choice.py`); a layer then
dispatches each call on its row count (`RoutedLinear`). Each path costs a copy of the
weights, so a class gets a path of its own only where that measured more than
`min_gain` faster than the paths kept for the others, and never one slower than oneDNN
(`linear_choice.fewest_copies`); native's packing stays wherever it was fastest at a
decode class, since the fused decode layer runs on it.

Same math in fp32; the summation order differs from MKL's, as between any two BLAS
builds. `pack_linears` applies a backend from outside the model, after loading and
sharding; CUDA models keep `nn.Linear`.
"""

from __future__ import annotations

import logging
import math
import platform
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.config import CpuLinearKind
from engine.cpu_kernels import CpuKernels, load_kernels
from engine.kernel_build import cpu_flags
from engine.linear_choice import (
    Choice,
    Measure,
    RowClasses,
    cache_key,
    choose,
    fewest_copies,
    time_interleaved,
)
from engine.model_source import cache_root

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


class RoutedLinear(PackedLinear):
    """A linear packed for more than one path; each call runs the path chosen for its
    row count's class (see `RowClasses.class_of`)."""

    def __init__(
        self, linear: nn.Linear, parts: Mapping[str, nn.Module], route: Mapping[str, str],
        classes: RowClasses,
    ) -> None:  # fmt: skip
        super().__init__()
        self._take(linear)
        self.parts = nn.ModuleDict(dict(parts))
        self.route = dict(route)
        one, by = self.parts[route["one"]], {c: self.parts[p] for c, p in route.items()}
        self.small: nn.Module = by.get("decode", by.get("prefill", one))
        self.large: nn.Module = by.get("prefill", self.small)
        self.one = one
        present = classes.rows()
        self.small_top = (
            math.isqrt(classes.decode_rows * classes.prefill_rows)
            if "decode" in present and "prefill" in present
            else (1 << 62 if "decode" in present else 1)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        part = self.one if rows <= 1 else self.small if rows <= self.small_top else self.large
        out: torch.Tensor = part(x)
        return out


def native_part(m: nn.Module) -> NativeLinear | None:
    """The native packing of a linear, if it has one."""
    if isinstance(m, NativeLinear):
        return m
    if isinstance(m, RoutedLinear) and "native" in m.parts:
        part = m.parts["native"]
        return part if isinstance(part, NativeLinear) else None
    return None


@dataclass(frozen=True)
class Packing:
    """What `pack_linears` did: the path per class, and the kernels if native is one."""

    picked: dict[str, str]
    kernels: CpuKernels | None
    extra_bytes: int = 0  # weight memory beyond one copy
    choice: Choice | None = None  # the measurement, where one was made or cached

    @property
    def paths(self) -> set[str]:
        return set(self.picked.values())


def pack_linears(
    model: nn.Module,
    dtype: torch.dtype,
    kind: CpuLinearKind,
    classes: RowClasses | None = None,
    measure: Measure | None = None,
    sampled: Sequence[str] = ("lm_head",),
    cache_dir: Path | None = None,
    min_gain: float = 0.10,
) -> Packing:
    """Replace every `nn.Linear` of `model` (a CPU model) by the path chosen for each
    class of `classes` (a decode batch of 32, a prefill chunk of 512 by default).
    "native", "onednn" and "plain" force one path ("native" fails if the kernels can't
    be built, "onednn" if it can't run `dtype`); "auto" times the candidates that
    apply (`measure`, by default on this model's shapes; see `time_linears`), or reads
    the choice cached for this kernel build, model and thread count (in `cache_dir`,
    by default the kernel build's directory), keeping another path only for a gain
    over `min_gain` (see `fewest_copies`). Linears named in
    `sampled` see only the rows being sampled, so they are not timed as a prefill.
    Tied weights (an LM head sharing the embedding) get a packed copy."""
    classes = classes or RowClasses(32, 512)
    rows = classes.rows()
    candidates = _candidates(dtype, kind)
    kernels = load_kernels() if "native" in candidates else None
    linears = _linears(model)
    choice = None
    if len(candidates) == 1:
        picked = {c: candidates[0] for c in rows}
    else:
        measure = measure or time_linears(linears, kernels, sampled, rows)
        shapes = sorted({(m.out_features, m.in_features, m.bias is not None) for *_, m in linears})
        key = cache_key(
            what="linear", shapes=shapes, layers=len(linears), dtype=str(dtype),
            threads=torch.get_num_threads(), rows=rows, candidates=candidates,
            torch=torch.__version__, machine=platform.machine(), cpu=sorted(cpu_flags()),
        )  # fmt: skip
        where = cache_dir or (cache_root() / "kernels" if kernels is None else kernels.path.parent)
        choice = choose(
            "CPU matmul path per row class", rows, candidates, measure,
            where / f"linear-choice-{key}.json", key,
            pick=fewest_copies(min_gain, "onednn", keep=_native_for_decode),
        )  # fmt: skip
        picked = choice.picked
    paths = sorted(set(picked.values()))
    if paths == ["plain"]:
        return Packing(picked, None, choice=choice)
    extra = 0
    for parent, name, lin in linears:
        parts = {p: _build(p, lin, kernels) for p in paths}
        if len(parts) == 1:
            setattr(parent, name, parts[paths[0]])
            continue
        extra += sum(_storage_bytes(m) for m in parts.values()) - lin.weight.nbytes
        setattr(parent, name, RoutedLinear(lin, parts, picked, classes))
    if extra:
        log.info(
            "CPU matmuls keep %d packings (%s) for the row classes: %.1f MB of extra weight memory",
            len(paths), ", ".join(paths), extra / 1e6,
        )  # fmt: skip
    log.debug("packed %d linear layers for the CPU: %s", len(linears), picked)
    return Packing(picked, kernels if "native" in paths else None, extra, choice)


def _native_for_decode(seconds: Mapping[str, Mapping[str, float]]) -> set[str]:
    """Native, where it measured fastest at one row or a decode batch: the fused decode
    layer (engine/decode_gate.py), which may beat every per-op path there, runs only on
    native's packing."""
    fastest = {min(t, key=t.__getitem__) for c, t in seconds.items() if c in ("one", "decode")}
    return {"native"} & fastest


def time_linears(
    linears: Sequence[tuple[nn.Module, str, nn.Linear]],
    kernels: CpuKernels | None,
    sampled: Sequence[str],
    rows: Mapping[str, int],
    budget_s: float = 0.12,
) -> Measure:
    """A `Measure` over the distinct shapes of `linears`: each shape is packed once per
    candidate (on its first layer's weights) and timed interleaved; a class's seconds
    are the sum over shapes, each weighted by how many layers have it."""
    shapes: dict[tuple[int, int, bool], list[nn.Linear]] = {}
    head_shapes: set[tuple[int, int, bool]] = set()
    for _, name, lin in linears:
        shape = (lin.out_features, lin.in_features, lin.bias is not None)
        shapes.setdefault(shape, []).append(lin)
        if name in sampled:
            head_shapes.add(shape)
    packed: dict[tuple[tuple[int, int, bool], str], nn.Module] = {}
    top = max(r for c, r in rows.items() if c != "prefill")

    def measure(cls: str, n_rows: int, candidates: Sequence[str]) -> dict[str, float]:
        total = dict.fromkeys(candidates, 0.0)
        for shape, group in shapes.items():
            if shape in head_shapes and n_rows > top:
                continue
            mods = {}
            for c in candidates:
                if (shape, c) not in packed:
                    packed[shape, c] = _build(c, group[0], kernels)
                mods[c] = packed[shape, c]
            x = torch.randn(n_rows, shape[1], dtype=group[0].weight.dtype)
            with torch.no_grad():
                fns = {c: _call(m, x) for c, m in mods.items()}
                best = time_interleaved(fns, budget_s=budget_s)
            for c, s in best.items():
                total[c] += s * len(group)
        return total

    return measure


def _call(m: nn.Module, x: torch.Tensor) -> Callable[[], object]:
    return lambda: m(x)


def _linears(model: nn.Module) -> list[tuple[nn.Module, str, nn.Linear]]:
    return [
        (parent, name, child)
        for parent in list(model.modules())
        for name, child in list(parent.named_children())
        if isinstance(child, nn.Linear)
    ]


def _build(path: str, lin: nn.Linear, kernels: CpuKernels | None) -> nn.Module:
    if path == "native":
        assert kernels is not None
        return NativeLinear(lin, kernels)
    return OneDnnLinear(lin) if path == "onednn" else lin


def _storage_bytes(m: nn.Module) -> int:
    if isinstance(m, NativeLinear):
        return int(m.packed.nbytes)
    if isinstance(m, OneDnnLinear):
        return m.weight_nbytes  # oneDNN's blocked copy, about the plain size
    return sum(p.nbytes for p in m.parameters())


def _candidates(dtype: torch.dtype, kind: CpuLinearKind) -> list[str]:
    """The paths `kind` allows for `dtype`, fastest-first by default; errors for a
    forced path that can't run."""
    if kind == "plain":
        return ["plain"]
    if kind == "native":
        if dtype != torch.float32:
            raise ValueError(f"cpu_linear='native' needs float32 weights, got {dtype}")
        if load_kernels() is None:
            raise RuntimeError("cpu_linear='native': the CPU kernels could not be built (see log)")
        return ["native"]
    if kind == "onednn":
        if not onednn_available(dtype):
            raise RuntimeError(f"cpu_linear='onednn': oneDNN can't run {dtype} on this build")
        return ["onednn"]
    out = []
    if dtype == torch.float32 and load_kernels() is not None:
        out.append("native")
    if onednn_available(dtype):
        out.append("onednn")
    if not out:
        log.warning("no packed CPU matmul for %s: using plain F.linear", dtype)
    return [*out, "plain"]
