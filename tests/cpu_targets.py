"""Which compiler targets the native CPU kernels are tested for on this host."""

from __future__ import annotations

import platform
from pathlib import Path


def has_avx2() -> bool:
    """An x86-64 host that runs x86-64-v3 code (AVX2, FMA, F16C, BMI2)."""
    if platform.machine() != "x86_64":
        return False
    lines = Path("/proc/cpuinfo").read_text().splitlines()
    flags = next((ln for ln in lines if ln.startswith("flags")), "").split()
    return {"avx2", "fma", "f16c", "bmi2"} <= set(flags)


# The host's own build, and on x86 hosts with AVX2 also the build for x86-64-v3 (AVX2,
# no AVX-512): the code path of most x86 servers without AVX-512.
MARCHES = ["native"] + (["x86-64-v3"] if has_avx2() else [])
