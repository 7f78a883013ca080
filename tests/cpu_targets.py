"""Which compiler targets the native CPU kernels are tested for on this host."""

from __future__ import annotations

import platform

from engine.kernel_build import cpu_flags


def has_avx2() -> bool:
    """An x86-64 host that runs x86-64-v3 code (AVX2, FMA, F16C, BMI2)."""
    return platform.machine() == "x86_64" and {"avx2", "fma", "f16c", "bmi2"} <= cpu_flags()


# The host's own build, and on x86 hosts with AVX2 also the build for x86-64-v3 (AVX2,
# no AVX-512): the code path of most x86 servers without AVX-512.
MARCHES = ["native"] + (["x86-64-v3"] if has_avx2() else [])
