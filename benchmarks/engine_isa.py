"""The engine benchmark across ISA builds of the kernels, and its results history.

`--march native,x86-64-v3` runs the whole benchmark once per target, each in its own
process started with `$PDSERVE_KERNEL_MARCH` set, so the engine loads (and its path
selection measures) kernels built for that target; an AVX-512 host thus also measures
what an AVX2-only host would run. The peer, when asked for, runs once, before them,
and every build is compared with that one run.

Every run appends one line of figures to `benchmarks/engine_results.jsonl` (committed;
README shows only the latest figures per ISA class).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from engine.kernel_build import MARCH_ENV, cpu_flags

HISTORY = Path(__file__).with_name("engine_results.jsonl")
_CHILD_TIMEOUT_S = 3 * 3600.0
# Read by oneDNN and MKL at their first call: they hold torch's matmuls (HF's, and the
# engine's oneDNN and plain paths) to an AVX2 build's vector unit on an AVX-512 host,
# so that a run of that build is the one an AVX2-only host would see.
AVX2_CAPS = {"ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}


def isa_class(march: str) -> str:
    """The vector ISA a build targets, as README groups the figures."""
    if march == "native":
        flags = cpu_flags()
        if "avx512f" in flags:
            return "AVX-512"
        return "AVX2" if "avx2" in flags else "other"
    if march in ("x86-64-v4",) or "avx512" in march:
        return "AVX-512"
    return "AVX2" if march in ("x86-64-v3", "haswell", "znver2", "znver3") else march


def run_per_march(marches: list[str], argv: list[str], out_dir: Path) -> int:
    """Run `python -m benchmarks.engine argv...` once per target, in turn; returns the
    worst exit status. Each child writes its JSON to `out_dir/engine-<march>.json`. An
    AVX2 target's child runs with oneDNN and MKL capped at AVX2 (`AVX2_CAPS`)."""
    worst = 0
    for march in marches:
        caps = AVX2_CAPS if isa_class(march) == "AVX2" else {}
        env = dict(os.environ, **{MARCH_ENV: march}, **caps)
        out = out_dir / f"engine-{march}.json"
        cmd = [sys.executable, "-m", "benchmarks.engine", *argv, "--out", str(out)]
        capped = ", oneDNN and MKL capped at AVX2" if caps else ""
        title = f"kernels built for -march={march} ({isa_class(march)}{capped})"
        print(f"==== {title} ====", flush=True)
        done = subprocess.run(cmd, env=env, timeout=_CHILD_TIMEOUT_S, check=False)
        worst = max(worst, done.returncode)
    return worst


def without_flags(argv: list[str], flags: tuple[str, ...]) -> list[str]:
    """argv less each of `flags` and its value (as `--flag V` or `--flag=V`)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg in flags:
            skip = True
        elif not any(arg.startswith(f + "=") for f in flags):
            out.append(arg)
    return out


def append_history(record: dict[str, Any], path: Path = HISTORY) -> Path:
    """Add one run's figures as a line of JSON."""
    record = {"utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **record}
    with path.open("a") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
    return path
