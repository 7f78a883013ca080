"""The engine's native CPU kernels (`engine/csrc/*.c`): built on first use, then cached.

The C sources are compiled with the host's C compiler for the host's CPU
(`-march=native`) into `$PDSERVE_CACHE/kernels/<key>/`, where the key hashes the
sources, the flags, the compiler's version and the CPU's feature flags, so a cache on
a shared home directory never hands one CPU's build to another. Concurrent first uses
(several ranks starting at once) each compile to a private file and rename it into
place, so the cache is never seen half written. The library links OpenMP by its
soname and is loaded after torch, so it shares torch's OpenMP runtime and threads.

`load_kernels()` returns None, with the reason logged once, when there is no compiler
or the build fails; callers fall back to another matmul and say so.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from engine.model_source import cache_root

log = logging.getLogger(__name__)

_SOURCES = ("cpu_matmul.c",)
_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11")
_BUILD_TIMEOUT_S = 120.0
_i64 = ctypes.c_int64
_ptr = ctypes.c_void_p


class KernelBuildError(RuntimeError):
    pass


def _cpu_features() -> str:
    """The CPU's model and feature flags, as the kernel cache key sees them."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor()
    keep = [ln for ln in text.splitlines() if ln.startswith(("model name", "flags", "Features"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise KernelBuildError("no C compiler (set CC, or install gcc)")
    return cc


def _run(cmd: list[str]) -> str:
    try:
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=_BUILD_TIMEOUT_S, check=False
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        raise KernelBuildError(f"{cmd[0]}: {e}") from e
    if done.returncode != 0:
        raise KernelBuildError(f"{' '.join(cmd)} failed:\n{done.stderr.strip()[-2000:]}")
    return done.stdout


def build_library() -> Path:
    """The kernel library's path, compiling it into the cache if it is not there."""
    src_dir = Path(__file__).parent / "csrc"
    sources = [src_dir / name for name in _SOURCES]
    cc = _compiler()
    key = hashlib.sha256()
    for part in (
        *(s.read_bytes() for s in sources),
        " ".join(_FLAGS).encode(),
        _run([cc, "--version"]).encode(),
        platform.machine().encode(),
        _cpu_features().encode(),
    ):
        key.update(part)
    out_dir = cache_root() / "kernels" / key.hexdigest()[:16]
    lib = out_dir / "libpdkernels.so"
    if lib.exists():
        return lib
    out_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_dir, suffix=".so.tmp")
    os.close(fd)
    try:
        _run([cc, *_FLAGS, *map(str, sources), "-o", tmp])
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built CPU kernels into %s", lib)
    return lib


class CpuKernels:
    """Typed entry points into the loaded library."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lib = ctypes.CDLL(str(path))
        self._lib.pd_block_cols.restype = _i64
        self._lib.pd_packed_numel.argtypes = [_i64, _i64]
        self._lib.pd_packed_numel.restype = _i64
        self._lib.pd_pack.argtypes = [_ptr, _ptr, _i64, _i64]
        self._lib.pd_pack.restype = None
        self._lib.pd_linear.argtypes = [
            _ptr,
            _i64,
            _ptr,
            _ptr,
            _ptr,
            _i64,
            _i64,
            _i64,
            _i64,
            ctypes.c_int,
        ]
        self._lib.pd_linear.restype = None
        self._linear = self._lib.pd_linear
        self.block_cols = int(self._lib.pd_block_cols())

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """A [N, K] fp32 weight in the kernel's column-block layout (a new 1-D tensor)."""
        if weight.dtype != torch.float32 or weight.dim() != 2 or weight.device.type != "cpu":
            raise ValueError(f"pack wants a 2-D fp32 CPU weight, got {weight.dtype} {weight.shape}")
        w = weight.detach().contiguous()
        n, k = w.shape
        packed = torch.empty(int(self._lib.pd_packed_numel(n, k)), dtype=torch.float32)
        if packed.data_ptr() % 64:  # the kernel's aligned vector loads need this
            raise RuntimeError("the CPU allocator returned a buffer not 64-byte aligned")
        self._lib.pd_pack(w.data_ptr(), packed.data_ptr(), n, k)
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


@functools.cache
def load_kernels() -> CpuKernels | None:
    """The kernels for this host, or None (logged once) when they can't be built."""
    try:
        return CpuKernels(build_library())
    except (KernelBuildError, OSError) as e:
        log.warning("native CPU kernels unavailable, falling back: %s", e)
        return None
