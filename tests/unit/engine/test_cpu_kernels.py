"""The native CPU kernels against torch: matmul, norm, gate, paged decode attention;
the build cache; the choice of matmul backend."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from cpu_targets import MARCHES
from torch import nn

from engine import EngineConfig
from engine.attention import _decode
from engine.cpu_kernels import CpuKernels, load_kernels
from engine.cpu_linear import NativeLinear, OneDnnLinear, onednn_available, pack_linears
from engine.kernel_build import MARCH_ENV, KernelBuildError, build_library, cpu_flags
from engine.model import RMSNorm


@pytest.fixture(scope="module", params=MARCHES)
def kernels(request: pytest.FixtureRequest) -> CpuKernels:
    if request.param == "native":
        k = load_kernels()
        assert k is not None, "the CPU kernels must build on the test machine"
        return k
    return CpuKernels(build_library(request.param))


def reference(lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    bias = None if lin.bias is None else lin.bias.double()
    return torch.nn.functional.linear(x.double(), lin.weight.double(), bias)


@pytest.mark.parametrize(("n", "k"), [(50, 37), (64, 576), (96, 1), (33, 130)])
@pytest.mark.parametrize("bias", [False, True])
def test_native_linear_matches_fp64(kernels, n, k, bias) -> None:
    torch.manual_seed(n * k)
    lin = nn.Linear(k, n, bias=bias)
    packed = NativeLinear(lin, kernels)
    for m in (1, 2, 3, 4, 5, 6, 7, 8, 11, 12, 13, 25, 40):
        x = torch.randn(m, k)
        out = packed(x)
        assert out.shape == (m, n) and out.dtype == torch.float32
        torch.testing.assert_close(out.double(), reference(lin, x), rtol=1e-5, atol=1e-5)


# The vector unit each named target's build must pick its tiles for.
_TARGET_ISA = {"x86-64-v3": "avx2", "x86-64": "generic", "armv8-a": "generic"}


def test_each_build_uses_its_targets_vector_unit(kernels) -> None:
    flags = cpu_flags()
    if kernels.path == build_library("native"):
        want = "avx512" if "avx512f" in flags else "avx2" if {"avx2", "fma"} <= flags else None
        if want is not None and platform.machine() == "x86_64":
            assert kernels.isa == want
    else:
        assert kernels.isa == "avx2"


def test_generic_build_matches_fp64(tmp_path, monkeypatch) -> None:
    """The plain-vector fallback (no AVX2/AVX-512; what Arm builds run) computes the
    same products, every tile height and a partial last column block."""
    target = _BASELINE_MARCH.get(platform.machine())
    if target is None:
        pytest.skip(f"no baseline target known for {platform.machine()}")
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    generic = CpuKernels(build_library(target))
    assert generic.isa == _TARGET_ISA[target]
    torch.manual_seed(3)
    lin = nn.Linear(45, 70)
    packed = NativeLinear(lin, generic)
    for m in (1, 2, 3, 4, 5, 9):
        x = torch.randn(m, 45)
        torch.testing.assert_close(packed(x).double(), reference(lin, x), rtol=1e-5, atol=1e-5)


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
    blocks = -(-96 // kernels.block_cols)  # column blocks, the last zero-padded
    assert packed.packed.numel() == blocks * kernels.block_cols * 64


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


# A baseline target of each architecture, other than `native`.
_BASELINE_MARCH = {"x86_64": "x86-64", "aarch64": "armv8-a"}


def test_the_target_cpu_can_be_named(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path))
    target = _BASELINE_MARCH.get(platform.machine())
    if target is not None:
        monkeypatch.setenv(MARCH_ENV, target)
        named = build_library()
        monkeypatch.delenv(MARCH_ENV)
        assert build_library() != named  # another target, another cache entry
    monkeypatch.setenv(MARCH_ENV, "native; rm -rf /")
    with pytest.raises(KernelBuildError, match="not a -march target"):
        build_library()


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
    assert pack_linears(model, torch.float32, "native").paths == {"native"}
    assert all(isinstance(model[i], NativeLinear) for i in (0, 2))
    torch.testing.assert_close(model(x), want)

    model = tiny()
    assert pack_linears(model, torch.float32, "plain").paths == {"plain"}
    assert isinstance(model[0], nn.Linear)

    if onednn_available(torch.float32):
        model = tiny()
        assert pack_linears(model, torch.float32, "onednn").paths == {"onednn"}
        assert isinstance(model[0], OneDnnLinear)
        torch.testing.assert_close(model(x), want)

    with pytest.raises(ValueError, match="cpu_linear"):
        pack_linears(tiny().to(torch.bfloat16), torch.bfloat16, "native")


def test_config_rejects_an_unknown_backend() -> None:
    with pytest.raises(ValueError, match="cpu_linear"):
        EngineConfig(cpu_linear="fast")  # type: ignore[arg-type]


def test_rms_norm_matches_torch(kernels) -> None:
    norm = RMSNorm(96, 1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    for rows in (1, 3, 40):
        x = torch.randn(rows, 160)[:, 10:106]  # strided rows
        got = kernels.rms_norm(x, norm.weight.detach(), norm.eps)
        torch.testing.assert_close(got, norm(x), rtol=1e-6, atol=1e-6)


def test_silu_mul_matches_torch(kernels) -> None:
    for rows in (1, 20):
        gate_up = torch.randn(rows, 2 * 70) * 4
        gate_up[0, :6] = torch.tensor([-100.0, 100.0, -88.5, 88.5, 0.0, -87.4])  # exp's edges
        gate, up = gate_up.split(70, dim=-1)
        want = torch.nn.functional.silu(gate) * up
        torch.testing.assert_close(kernels.silu_mul(gate_up), want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(("q_heads", "kv_heads"), [(9, 3), (4, 4), (8, 1)])
def test_decode_attention_matches_torch_on_a_scattered_cache(kernels, q_heads, kv_heads) -> None:
    torch.manual_seed(q_heads * 10 + kv_heads)
    blocks, block_size, dim = 64, 8, 32
    k_cache = torch.randn(blocks, block_size, kv_heads, dim)
    v_cache = torch.randn(blocks, block_size, kv_heads, dim)
    lens = torch.tensor([1, 8, 9, 200, 77])
    width = int((lens.max() + block_size - 1) // block_size)
    tables = torch.stack([torch.randperm(blocks)[:width] for _ in lens])  # scattered blocks
    qk = torch.randn(len(lens), q_heads + kv_heads, dim)  # q as the model slices it
    q = qk[:, :q_heads]
    mask = (torch.arange(width * block_size)[None, :] < lens[:, None])[:, None, None, :]
    want = _decode(q, k_cache, v_cache, tables, mask, 0.2)
    out = torch.empty(len(lens), q_heads, dim)
    kernels.decode_attention(q, k_cache, v_cache, tables, lens, 0.2, out)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def torch_word_sums(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int64).sum(dim=(-3, -2, -1), dtype=torch.int64)


@pytest.mark.parametrize("lead", [(2, 5), (3, 2, 5)])
@pytest.mark.parametrize(
    "src_heads, dst_total, dst_heads",
    [((1, 4), 5, (2, 5)), ((0, 6), 6, (0, 6)), ((0, 6), 7, (1, 7))],
    ids=["strided slots", "whole blocks", "whole source blocks into strided slots"],
)
def test_word_sums_match_torch_and_copy_in_one_pass(
    kernels, lead, src_heads, dst_total, dst_heads
) -> None:
    cache = torch.randn(*lead, 4, 6, 8)  # [..., slot, head, dim]
    cache.view(torch.int64)[..., 0, 0, 0] = 2**62  # sums wrap past 2**63
    src = cache[..., slice(*src_heads), :]
    want = torch_word_sums(src)
    torch.testing.assert_close(kernels.word_sums(src), want, rtol=0, atol=0)
    dst_cache = torch.zeros(*lead, 4, dst_total, 8)
    dst = dst_cache[..., slice(*dst_heads), :]
    torch.testing.assert_close(kernels.word_sums(src, dst), want, rtol=0, atol=0)
    assert torch.equal(dst, src)
    dst.zero_()
    assert torch.count_nonzero(dst_cache) == 0  # nothing written outside dst


@pytest.mark.parametrize("lead", [(7,), (2, 7), (3, 2, 7)])
def test_word_sums_take_blocks_by_id_on_either_side(kernels, lead) -> None:
    """Blocks picked by id: summed in place, gathered into a contiguous buffer,
    scattered out of one, or copied id to id, in the order the ids give."""
    cache = torch.randn(*lead, 4, 6, 8)
    src = cache[..., 1:4, :]  # strided slots
    src_ids = torch.tensor([5, 0, 6, 2], dtype=torch.int64)
    dst_ids = torch.tensor([1, 3, 4, 0], dtype=torch.int64)
    picked = src[..., src_ids, :, :, :]
    want = torch_word_sums(picked)
    torch.testing.assert_close(kernels.word_sums(src, src_blocks=src_ids), want, rtol=0, atol=0)
    gathered = torch.zeros_like(picked)
    sums = kernels.word_sums(src, gathered, src_blocks=src_ids)
    torch.testing.assert_close(sums, want, rtol=0, atol=0)
    assert torch.equal(gathered, picked)
    dst_cache = torch.zeros(*lead, 4, 5, 8)
    dst = dst_cache[..., 2:5, :]
    torch.testing.assert_close(
        kernels.word_sums(gathered, dst, dst_blocks=dst_ids), want, rtol=0, atol=0
    )
    assert torch.equal(dst[..., dst_ids, :, :, :], picked)
    untouched = [b for b in range(lead[-1]) if b not in dst_ids.tolist()]
    assert torch.count_nonzero(dst_cache[..., untouched, :, :, :]) == 0
    assert torch.count_nonzero(dst_cache[..., :2, :]) == 0  # other heads
    dst_cache.zero_()
    torch.testing.assert_close(
        kernels.word_sums(src, dst, src_blocks=src_ids, dst_blocks=dst_ids), want, rtol=0, atol=0
    )
    assert torch.equal(dst[..., dst_ids, :, :, :], picked)


def test_word_sums_check_block_ids(kernels) -> None:
    cache = torch.randn(2, 7, 4, 6, 8)
    with pytest.raises(IndexError, match="outside"):
        kernels.word_sums(cache, src_blocks=torch.tensor([0, 7]))
    with pytest.raises(IndexError, match="outside"):
        kernels.word_sums(cache, src_blocks=torch.tensor([-1]))
    with pytest.raises(ValueError, match="int64"):
        kernels.word_sums(cache, src_blocks=torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="does not match"):  # 2 blocks into 3
        kernels.word_sums(cache, torch.empty(2, 3, 4, 6, 8), src_blocks=torch.tensor([0, 1]))


def test_word_sums_reuse_a_layout_plan_and_check_each_call(kernels) -> None:
    """Calls over one layout share its worked-out arguments; each call's data,
    alignment and block ids are still its own."""
    cache = torch.randn(2, 7, 4, 6, 8)
    for b in range(3):  # the same shape and strides over different blocks
        view = cache[:, b : b + 4]
        torch.testing.assert_close(kernels.word_sums(view), torch_word_sums(view), rtol=0, atol=0)
    assert kernels.word_sums(cache, src_blocks=torch.tensor([6, 0])) is not None
    with pytest.raises(IndexError, match="outside"):  # the same layout, ids out of range
        kernels.word_sums(cache, src_blocks=torch.tensor([0, 7]))
    flat = torch.zeros(2 * 7 * 4 * 6 * 8 + 1)
    aligned, shifted = flat[:-1].view(2, 7, 4, 6, 8), flat[1:].view(2, 7, 4, 6, 8)
    assert aligned.data_ptr() % 8 == 0 and aligned.stride() == shifted.stride()
    assert kernels.word_sums(aligned) is not None
    assert kernels.word_sums(shifted) is None  # 4-byte aligned: not whole 64-bit words


def test_word_sums_decline_layouts_they_cant_take(kernels) -> None:
    assert kernels.word_sums(torch.randn(2, 3, 4, 2, 3)) is None  # 12-byte rows
    assert kernels.word_sums(torch.randn(2, 3, 4, 2, 8).transpose(-1, -2)) is None
    assert kernels.word_sums(torch.randn(4, 2, 8)) is None  # no block dim
    src = torch.randn(2, 3, 4, 2, 8)
    assert kernels.word_sums(src, torch.empty_like(src)) is not None
    # A destination off the CPU: declined, never treated as no destination.
    assert kernels.word_sums(src, torch.empty_like(src, device="meta")) is None


class _Recorder:
    def __init__(self) -> None:
        self.steps: list[list[int]] = [[]]

    def on_layer_done(self, layer: int, chunks) -> None:
        self.steps[-1].append(layer)

    def on_step_done(self, chunks) -> None:
        self.steps.append([])


def test_fused_decode_reports_every_layer_to_the_hook(tiny_model_dir) -> None:
    """KV streaming relies on the per-layer hook; decode-only steps run fused layers."""
    from engine import SamplingParams
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine

    hook = _Recorder()
    engine = LLMEngine(
        EngineConfig(
            model=str(tiny_model_dir), num_threads=1, max_model_len=256, cpu_linear="native"
        ),
        layer_hook=hook,
    )
    model = engine.runner.model
    assert model.fused_decode is not None
    engine.add_request("r", [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=5))
    while engine.has_unfinished_requests():
        engine.step()
    layers = list(range(len(model.layers)))
    steps = hook.steps[:-1]
    assert len(steps) == 5 and all(step == layers for step in steps)  # prefill + 4 decodes
    assert engine.block_pool.num_free == engine.block_pool.num_blocks  # no blocks leaked
