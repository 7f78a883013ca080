"""Packed CPU linears: the native kernel's math, its build cache and backend choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from engine import EngineConfig
from engine.cpu_kernels import CpuKernels, KernelBuildError, build_library, load_kernels
from engine.cpu_linear import NativeLinear, OneDnnLinear, onednn_available, pack_linears


@pytest.fixture(scope="module")
def kernels() -> CpuKernels:
    k = load_kernels()
    assert k is not None, "the CPU kernels must build on the test machine"
    return k


def reference(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if lin.bias is None else lin.bias.double()
    return torch.nn.functional.linear(x.double(), lin.weight.double(), bias)


@pytest.mark.parametrize(("n", "k"), [(50, 37), (64, 576), (96, 1), (33, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_native_linear_matches_fp64(kernels, n, k, bias) -> None:
    torch.manual_seed(n * k)
    lin = nn.Linear(k, n, bias=bias)
    packed = NativeLinear(lin, kernels)
    for m in (1, 2, 3, 4, 5, 6, 7, 12, 13, 40):
        x = torch.randn(m, k)
        out = packed(x)
        assert out.shape == (m, n) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference(lin, x), rtol=1e-5, atol=1e-5)


def test_native_linear_takes_strided_rows_and_leading_dims(kernels) -> None:
    lin = nn.Linear(40, 70)
    packed = NativeLinear(lin, kernels)
    wide = torch.randn(3, 5, 100)
    x = wide[..., 10:50]  # rows 100 floats apart
    torch.testing.assert_close(packed(x).double(), reference(lin, x), rtol=1e-5, atol=1e-5)
    cols = torch.randn(40, 6).t()  # last dim not contiguous
    torch.testing.assert_close(packed(cols).double(), reference(lin, cols), rtol=1e-5, atol=1e-5)


def test_native_linear_keeps_only_the_packed_weight(kernels) -> None:
    lin = nn.Linear(64, 96, bias=False)
    packed = NativeLinear(lin, kernels)
    assert not list(packed.parameters())
    assert packed.nbytes == lin.weight.nbytes
    assert packed.packed.numel() == 3 * 32 * 64  # three 32-column blocks


def test_kernels_share_torchs_openmp_runtime(kernels) -> None:
    maps = Path("/proc/self/maps").read_text().splitlines()
    runtimes = {line.split()[-1] for line in maps if "libgomp" in line or "libiomp" in line}
    assert len(runtimes) == 1, runtimes


def test_build_is_cached_and_keyed(kernels, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    first = build_library()
    assert first.is_relative_to(tmp_path / "kernels")
    stamp = first.stat().st_mtime_ns
    assert build_library() == first and first.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == ["libpdkernels.so"]  # no temp files
    other = CpuKernels(first)
    lin = nn.Linear(8, 8)
    x = torch.randn(2, 8)
    torch.testing.assert_close(NativeLinear(lin, other)(x), NativeLinear(lin, kernels)(x))


def test_build_failure_is_an_error_not_a_crash(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "/bin/false")
    with pytest.raises(KernelBuildError, match="false"):
        build_library()
    assert not list((tmp_path).rglob("*.so*"))


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.SiLU(), nn.Linear(32, 8, bias=False))


def test_pack_linears_chooses_by_dtype_and_setting(kernels) -> None:
    model = tiny()
    x = torch.randn(3, 16)
    want = model(x)
    assert pack_linears(model, torch.float32, "auto") == "native"
    assert all(isinstance(model[i], NativeLinear) for i in (0, 2))
    torch.testing.assert_close(model(x), want)

    model = tiny()
    assert pack_linears(model, torch.float32, "plain") == "plain"
    assert isinstance(model[0], nn.Linear)

    if onednn_available(torch.float32):
        model = tiny()
        assert pack_linears(model, torch.float32, "onednn") == "onednn"
        assert isinstance(model[0], OneDnnLinear)
        torch.testing.assert_close(model(x), want)

    with pytest.raises(ValueError, match="cpu_linear"):
        pack_linears(tiny().to(torch.bfloat16), torch.bfloat16, "native")


def test_config_rejects_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="cpu_linear"):
        EngineConfig(cpu_linear="fast")  # type: ignore[arg-type]
