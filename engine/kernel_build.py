"""Building the engine's native CPU kernels (`engine/csrc/*.c`) into a cached library.

The C sources are compiled with the host's C compiler for the host's CPU
(`-march=native`; `$PDSERVE_KERNEL_MARCH` names another target, for a compiler that
does not know this CPU) into `$PDSERVE_CACHE/kernels/<key>/`, where the key hashes the
sources, the flags, the compiler's version and the CPU's feature flags, so a cache on
a shared home directory never hands one CPU's build to another. Concurrent first uses
(several ranks starting at once) each compile to a private file and rename it into
place, so the cache is never seen half written. `engine/cpu_kernels.py` loads the
result.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

from engine.model_source import cache_root

log = logging.getLogger(__name__)

_SOURCES = (
    "cpu_matmul.c",
    "cpu_attention.c",
    "cpu_pointwise.c",
    "cpu_decode_layer.c",
    "cpu_word_sums.c",
)
_HEADERS = ("pd_kernels.h", "pd_simd.h")
_FLAGS = ("-O3", "-fopenmp", "-shared", "-fPIC", "-std=gnu11", "-Wno-psabi")
MARCH_ENV = "PDSERVE_KERNEL_MARCH"
_BUILD_TIMEOUT_S = 120.0


class KernelBuildError(RuntimeError):
    pass


def _cpuinfo_lines(*prefixes: str) -> list[str] | None:
    """/proc/cpuinfo's distinct lines that start with one of `prefixes`, sorted."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return sorted({ln for ln in text.splitlines() if ln.startswith(prefixes)})


def _cpu_features() -> str:
    """The CPU's model and feature flags, as the kernel cache key sees them."""
    lines = _cpuinfo_lines("model name", "flags", "Features")
    return platform.processor() if lines is None else "\n".join(lines)


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (x86 `flags`, Arm `Features`); empty if unknown."""
    lines = _cpuinfo_lines("flags", "Features") or []
    return frozenset(word for ln in lines for word in ln.partition(":")[2].split())


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


def build_library(march: str | None = None) -> Path:
    """The kernel library's path, compiling it into the cache if it is not there.
    `march`: the compiler's target (-march=...); by default $PDSERVE_KERNEL_MARCH, else
    `native`, this CPU."""
    march = march or os.environ.get(MARCH_ENV) or "native"
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", march):
        raise KernelBuildError(f"{MARCH_ENV}: not a -march target: {march!r}")
    flags = (*_FLAGS, f"-march={march}")
    src_dir = Path(__file__).parent / "csrc"
    sources = [src_dir / name for name in _SOURCES]
    cc = _compiler()
    key = hashlib.sha256()
    for part in (
        *(s.read_bytes() for s in sources),
        *((src_dir / h).read_bytes() for h in _HEADERS),
        " ".join(flags).encode(),
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
        _run([cc, *flags, *map(str, sources), "-o", tmp])
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    log.info("built CPU kernels into %s", lib)
    return lib
