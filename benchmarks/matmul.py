"""Matmul benchmark: the engine's native fp32 kernel against oneDNN and torch, per shape.

    python -m benchmarks.matmul [--march TARGET] [--peer-isa match|host] [--rows 1,8,32,512]
                                [--threads 2] [--clock wall|cpu] [--rounds 3] [--budget 0.3]
                                [--out benchmarks/results/matmul-TARGET.json]

What runs. Every linear layer shape of the model (`--model`, SmolLM2-135M-Instruct by
default; the shapes come from its config.json: the fused QKV, the attention output,
the fused gate/up, the down projection and the LM head), each for M = `--rows` rows
of input, y = x @ w^T in fp32 on `--threads` torch threads, three ways:
  * native: `engine/csrc/cpu_matmul.c` built for `--march` (default: this CPU), on
    its packed weight (`CpuKernels.pack`), as `NativeLinear` calls it;
  * onednn: oneDNN's packed weight and `torch.ops.mkldnn._linear_pointwise`, as
    `OneDnnLinear` calls it;
  * torch: `x @ w.T` on the plain weight (MKL's sgemm in the x86 wheels).
The weights are random (seeded) with the model's shapes: speed does not depend on
the values. Each (shape, M) first checks that native matches torch to fp32 tolerance.

Another target's build on this CPU. `--march x86-64-v3` builds the AVX2 kernels on an
AVX-512 host. oneDNN and MKL pick their code at run time, so there they would still
use AVX-512; with `--peer-isa match` (the default) they are capped at the build's
vector unit (ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS, set before their first
call), which makes the comparison the one an AVX2-only host would see. `--peer-isa
host` leaves them uncapped.

Method. All three run in this one process, on the same inputs, with the same thread
count. A round times each candidate in turn (the order rotates every round): calls
back to back for `--budget` seconds (at least 3 calls, after 2 untimed warm-up
calls), each call timed alone by wall clock. GFLOP/s = 2*M*N*K / seconds, at the best
(minimum) call over all rounds, which is what a shared host distorts least (others
can only slow a call down), and at the median. Ratios are native over oneDNN, best
against best. Weights that fit the caches stay in them between calls, for every
candidate alike: for M = 1 this is the hot-cache speed, not a decode step's stream
from memory (benchmarks/engine.py measures that end to end). `other_cpus` in the
JSON is how many CPUs other processes kept busy during the run.

A busy host. With other processes runnable on every CPU, a parallel call waits for
its sleeping worker thread to be scheduled, and wall-clock times of short calls
measure the scheduler more than the kernel. `--threads 1 --clock cpu` then times each
call by the calling thread's CPU time (`time.thread_time`; one torch thread runs the
call on the calling thread), which leaves out the time the thread was not running:
the per-core speed of each candidate, comparable between them though not a 2-thread
figure.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import Timing, cpu_snapshot, host_info, other_cores, write_json
from benchmarks.engine_isa import AVX2_CAPS
from engine.cpu_kernels import CpuKernels
from engine.kernel_build import build_library, cpu_flags
from engine.model_source import resolve_model

log = logging.getLogger(__name__)

MODEL = "smollm2-135m-instruct"
RESULTS_DIR = Path(__file__).parent / "results"
CANDIDATES = ("native", "onednn", "torch")
# Caps that hold the peers to a native build's narrower vector unit than the host's.
_PEER_CAPS = {"avx2": AVX2_CAPS}


@dataclass(frozen=True)
class Shape:
    name: str
    n: int  # output features
    k: int  # input features


@dataclass(frozen=True)
class Row:
    """One (shape, M): each candidate's call times."""

    shape: Shape
    m: int
    times: dict[str, Timing]

    @property
    def flop(self) -> int:
        return 2 * self.m * self.shape.n * self.shape.k

    def gflops(self, name: str) -> tuple[float, float]:
        """(best, median) GFLOP/s of candidate `name`."""
        t = self.times[name]
        return self.flop / t.best / 1e9, self.flop / t.median / 1e9

    def ratio(self) -> float:
        return self.times["onednn"].best / self.times["native"].best

    def as_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"shape": self.shape.name, "n": self.shape.n, "k": self.shape.k}
        out["m"] = self.m
        for name in self.times:
            best, median = self.gflops(name)
            out[name] = {"gflops_best": best, "gflops_median": median}
        out["native_over_onednn"] = self.ratio()
        return out


def model_shapes(model: str) -> list[Shape]:
    """The model's distinct linear-layer shapes, from its config.json."""
    cfg = json.loads((resolve_model(model) / "config.json").read_text())
    hidden, inter = int(cfg["hidden_size"]), int(cfg["intermediate_size"])
    heads = int(cfg["num_attention_heads"])
    kv_heads = int(cfg.get("num_key_value_heads", heads))
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    return [
        Shape("qkv", (heads + 2 * kv_heads) * head_dim, hidden),
        Shape("o", hidden, heads * head_dim),
        Shape("gate_up", 2 * inter, hidden),
        Shape("down", hidden, inter),
        Shape("lm_head", int(cfg["vocab_size"]), hidden),
    ]


def time_calls(
    fn: Callable[[], object], budget_s: float, clock: Callable[[], float]
) -> list[float]:
    """Seconds of each call of `fn` by `clock`, back to back for `budget_s` of wall time
    (3 calls at least), after 2 untimed ones."""
    fn()
    fn()
    samples: list[float] = []
    end = time.perf_counter() + budget_s
    while len(samples) < 3 or time.perf_counter() < end:
        began = clock()
        fn()
        samples.append(clock() - began)
    return samples


def measure_shape(
    kernels: CpuKernels, shape: Shape, rows: list[int], rounds: int, budget_s: float, cpu: bool
) -> list[Row]:
    clock = time.thread_time if cpu else time.perf_counter
    gen = torch.Generator().manual_seed(shape.n * 7 + shape.k)
    w = torch.randn(shape.n, shape.k, generator=gen) / shape.k**0.5
    packed = kernels.pack(w)
    onednn = torch.ops.mkldnn._reorder_linear_weight(w, 32)
    out = []
    for m in rows:
        x = torch.randn(m, shape.k, generator=gen)
        calls = candidates(kernels, x, w, packed, onednn)
        torch.testing.assert_close(calls["native"](), calls["torch"](), rtol=1e-4, atol=1e-4)
        samples: dict[str, list[float]] = {name: [] for name in CANDIDATES}
        for r in range(rounds):
            for i in range(len(CANDIDATES)):
                name = CANDIDATES[(i + r) % len(CANDIDATES)]
                samples[name] += time_calls(calls[name], budget_s, clock)
        row = Row(shape, m, {name: Timing(tuple(s)) for name, s in samples.items()})
        log.info("%s M=%d: native/onednn %.2f", shape.name, m, row.ratio())
        out.append(row)
    return out


def candidates(
    kernels: CpuKernels, x: torch.Tensor, w: torch.Tensor, packed: torch.Tensor, onednn: Any
) -> dict[str, Callable[[], torch.Tensor]]:
    """x @ w^T, each candidate's way, on its own form of the weight."""
    n = w.shape[0]
    return {
        "native": lambda: kernels.linear(x, packed, None, n),
        "onednn": lambda: torch.ops.mkldnn._linear_pointwise(x, onednn, None, "none", [], ""),
        "torch": lambda: x @ w.T,
    }


def table(rows: list[Row], title: str) -> str:
    head = f"{'shape':<8} {'N':>6} {'K':>5} {'M':>4} " + " ".join(f"{c:>13}" for c in CANDIDATES)
    lines = [title, "GFLOP/s, best (median)", head + "  native/onednn"]
    for r in rows:
        cells = []
        for name in CANDIDATES:
            best, median = r.gflops(name)
            cells.append(f"{best:6.1f} ({median:5.1f})".rjust(13))
        lines.append(
            f"{r.shape.name:<8} {r.shape.n:>6} {r.shape.k:>5} {r.m:>4} "
            + " ".join(cells)
            + f"  {r.ratio():13.2f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--march", default="native", help="the native build's -march (native)")
    parser.add_argument(
        "--peer-isa",
        choices=("match", "host"),
        default="match",
        help="cap oneDNN/MKL at the native build's vector unit (match), or not (host)",
    )
    parser.add_argument("--rows", default="1,8,32,512", help="row counts M (1,8,32,512)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per measurement (3)")
    parser.add_argument("--budget", type=float, default=0.3, help="seconds per candidate a round")
    parser.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time calls by wall clock, or (with --threads 1) by the thread's CPU time",
    )
    parser.add_argument("--model", default=MODEL, help=f"the model whose shapes run ({MODEL})")
    parser.add_argument("--out", type=Path, help="JSON path (benchmarks/results/matmul-MARCH.json)")
    args = parser.parse_args(argv)
    rows = [int(m) for m in args.rows.split(",")]
    if min(rows) < 1 or args.threads < 1 or args.rounds < 1 or args.budget <= 0:
        parser.error("--rows, --threads, --rounds and --budget must be positive")
    if args.clock == "cpu" and args.threads != 1:
        parser.error("--clock cpu times the calling thread, so it needs --threads 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    kernels = CpuKernels(build_library(args.march))
    caps = _PEER_CAPS.get(kernels.isa, {}) if args.peer_isa == "match" else {}
    os.environ.update(caps)  # read by oneDNN and MKL at their first call, which is below
    torch.set_num_threads(args.threads)
    began = cpu_snapshot()
    with torch.inference_mode():
        results = [
            row
            for shape in model_shapes(args.model)
            for row in measure_shape(
                kernels, shape, rows, args.rounds, args.budget, args.clock == "cpu"
            )
        ]
    busy = other_cores(began)
    title = (
        f"native build: -march={args.march} ({kernels.isa} tiles); peers capped: "
        f"{caps or 'no'}; {args.threads} threads; {args.clock} clock; "
        f"other processes used {busy:.2f} CPUs"
    )
    print(table(results, title))  # the benchmark's output
    report = {
        "host": host_info(),
        "cpu_flags": sorted(f for f in cpu_flags() if f.startswith(("avx", "fma"))),
        "march": args.march,
        "native_isa": kernels.isa,
        "library": str(kernels.path),
        "peer_caps": caps,
        "threads": args.threads,
        "clock": args.clock,
        "rounds": args.rounds,
        "budget_s": args.budget,
        "other_cpus": busy,
        "rows": results,
    }
    out = args.out or RESULTS_DIR / f"matmul-{args.march}.json"
    print(f"wrote {write_json(out, report)}")


if __name__ == "__main__":
    main()
