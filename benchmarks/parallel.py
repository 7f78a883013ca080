"""Parallel benchmark: the engine's TP x PP layouts against TP=1, PP=1 in the same run.

    python -m benchmarks.parallel [--quick] [--model smollm2-135m-instruct|tiny]
                                  [--layouts 1x1,3x1,1x2,1x3] [--repeats 3] [--threads N]
                                  [--out benchmarks/results/parallel.json]

A layout "TxP" is the offline `engine.LLM(model, tp=T, pp=P, num_threads=n)`: rank 0
drives the schedule here, ranks 1..T*P-1 are local processes over Gloo. Every layout
gets the same CPUs, n = max(1, usable CPUs // (T*P)) torch threads per rank (or
--threads), so TP=3 on 2 CPUs oversubscribes them. Layouts run one after another, the
1x1 baseline first, each engine closed (its ranks stopped) before the next starts;
fp32, prefix caching off. `--model tiny` is benchmarks.router_overhead's random
4-layer Llama. A layout the engine rejects (its ValueError, e.g. TP=2 with SmolLM2's 9
heads) is reported as skipped, with the reason.

Prefill: one 512-token prompt (--quick: 256) in one chunk, max_tokens=1, timed end to
end. Decode: 8 prompts of 32-64 tokens (--quick: 4), 32 greedy tokens each with
ignore_eos (--quick: 16), on benchmarks.engine's stepwise runner; decode tok/s =
B*(n-1) / (run - time until every row had its first token). One untimed warm-up each,
then --repeats runs (3; --quick: 1): median [best], and each layout's median over the
baseline's. Sanity: greedy tokens against the baseline's. The host is shared, so each
layout records the CPUs other processes kept busy meanwhile; on a busy 2-CPU host a
2-thread rank can stall far more than 1-thread ones (its threads wait for a core another
process holds), so compare with --threads 1 there.

GPU estimates (arithmetic, not measurements) for SmolLM2-135M in bf16 on one H100 SXM
(3.35 TB/s HBM3, 989 dense bf16 TFLOPS). Parameters: 30 layers x 3.54 M + the tied
49152 x 576 embedding (28.3 M) = 134.5 M, 269 MB in bf16.
* Decode is memory bound: a step reads every weight once, 269e6 B / 3.35e12 B/s =
  80 us (H200, 4.8 TB/s: 56 us). A batch shares that read and stays memory bound up to
  B ~ 989e12 / 3.35e12 ~ 300 rows (2 FLOP per 2-byte weight per row). Without CUDA
  graphs the ~300 kernel launches of a step (a few us each) cost more than the read.
* TP=t: each GPU reads 1/t of the weights (t=3: 27 us), but a step pays 2 all-reduces
  per layer plus the embedding's all-reduce and the LM head's all-gather: 62
  collectives x ~10 us NVLink latency = 0.62 ms, ~8x the whole TP=1 step. For a model
  this small TP slows decode.
* PP=p: each stage reads 1/p of the weights. A decode step goes through as two
  micro-batches, so stage s+1 computes one while stage s computes the other; each
  micro-batch re-reads the stage's weights, though. At p=2: 4 stage passes of
  134 MB / 3.35 TB/s = 40 us, two of them overlapped, = 120 us plus 2-3 sends of
  ~10 us, against 80 us on one GPU. For decode PP buys KV capacity and throughput
  per pipeline, not latency.
* Prefill of 1024 tokens: 2 x 106.2 M layer weights x 1024 = 2.18e11 FLOP, plus causal
  attention 2 x 2 x 30 x 1024^2 x 576 / 2 = 3.6e10, plus one LM-head row: 2.5e11 FLOP
  = 0.26 ms at 100% of 989 TFLOPS (2 x 134.5 M x 1024 = 2.8e11, 0.28 ms, if every row
  went through the LM head). Compute bound (reading the weights takes 0.08 ms). TP=t
  divides the 0.26 ms but adds 61 all-reduces of 1024 x 576 x 2 B = 1.2 MB (~10 us
  latency + ~3 us at ~450 GB/s = ~13 us each, 0.8 ms), so TP slows this prefill too;
  it pays off when one GPU's compute or memory is the limit (large models).
"""

from __future__ import annotations

import argparse
import logging
import os
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.common import (
    HostInfo,
    Rate,
    SourceState,
    Timing,
    cpu_snapshot,
    host_info,
    other_cores,
    source_state,
    write_json,
)
from benchmarks.engine_runs import (
    CORPUS,
    DecodeResult,
    PrefillResult,
    Rounds,
    long_prompt,
    make_prompts,
)
from benchmarks.engine_systems import Ours, Run, System
from engine import LLM, ModelConfig
from engine.model_source import resolve_model
from engine.parallel.layout import ParallelLayout
from engine.tokenizer import Tokenizer

log = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results" / "parallel.json"
DEFAULT_LAYOUTS = {"tiny": "1x1,2x1,1x2,2x2"}
SMOLLM2_LAYOUTS = "1x1,3x1,1x2,1x3"
BUSY_CORES = 0.25  # other processes' CPUs above which the table warns


def parse_layouts(text: str) -> list[ParallelLayout]:
    """Layouts from "1x1,3x1,1x2" (TPxPP), the 1x1 baseline first (added if missing)."""
    layouts = []
    for item in text.split(","):
        tp, sep, pp = item.strip().partition("x")
        if not (sep and tp.isdigit() and pp.isdigit()):
            raise ValueError(f"layout {item!r}: expected TPxPP, e.g. 3x1")
        layouts.append(ParallelLayout(int(tp), int(pp)))
    base = ParallelLayout()
    return [base] + [x for x in dict.fromkeys(layouts) if x != base]


def name(layout: ParallelLayout) -> str:
    return f"{layout.tp}x{layout.pp}"


@dataclass(frozen=True)
class LayoutResult:
    layout: str  # TPxPP
    num_threads: int  # torch threads per rank
    startup_s: float  # LLM(...) until every rank is ready
    prefill: PrefillResult
    decode: DecodeResult
    prefill_token: list[int]  # the prefill's greedy token
    decode_tokens: list[list[int]]  # each row's greedy tokens, first timed run
    other_cores: float  # CPUs other processes kept busy during the runs


@dataclass(frozen=True)
class Skipped:
    layout: str
    reason: str


@dataclass
class Settings:
    model: str
    layouts: list[ParallelLayout]
    repeats: int
    prefill_len: int
    batch: int
    out_len: int
    cpus: int
    threads: int | None  # per rank; None: max(1, cpus // ranks)
    quick: bool


@dataclass
class Report:
    settings: Settings
    host: HostInfo
    source: SourceState
    model_dir: str
    results: list[LayoutResult]  # the 1x1 baseline first
    skipped: list[Skipped]
    loadavg_end: tuple[float, float, float]


def measure(
    s: Settings, model_dir: Path, layout: ParallelLayout, prompts: list[list[int]], long: list[int]
) -> LayoutResult | Skipped:
    """Start `layout`'s engine, time its prefill and decode, and close it."""
    mc = ModelConfig.from_dir(model_dir)
    threads = s.threads or max(1, s.cpus // layout.world_size)
    max_len = s.prefill_len + 64
    kv_tokens = max(s.batch * (64 + s.out_len + 32), max_len + 16)
    began = time.perf_counter()
    try:
        layout.check(mc)  # the engine's own rule, before any rank is spawned
        llm = LLM(
            str(model_dir),
            tp=layout.tp,
            pp=layout.pp,
            num_threads=threads,
            dtype="float32",
            enable_prefix_caching=False,
            max_num_seqs=s.batch,
            max_model_len=max_len,
            max_num_batched_tokens=max(s.prefill_len, 64 * s.batch),
            kv_cache_bytes=kv_tokens * mc.kv_bytes_per_token(torch.float32),
        )
    except ValueError as e:
        log.info("layout %s skipped: %s", name(layout), e)
        return Skipped(name(layout), str(e))
    with llm:  # closing stops the other ranks
        startup = time.perf_counter() - began
        ours: System = Ours(llm)
        rounds, load = Rounds(s.repeats), cpu_snapshot()
        pre = rounds.run([ours], lambda o: o.prefill(long))[ours.name]
        dec = rounds.run([ours], lambda o: o.decode(prompts, s.out_len))[ours.name]
        busy = other_cores(load)
    return LayoutResult(
        layout=name(layout),
        num_threads=threads,
        startup_s=startup,
        prefill=PrefillResult(name(layout), len(long), _times(pre, lambda r: r.total_s)),
        decode=DecodeResult(
            system=name(layout),
            batch=len(prompts),
            out_len=s.out_len,
            prompt_tokens=sum(len(p) for p in prompts),
            total_s=_times(dec, lambda r: r.total_s),
            first_s=_times(dec, lambda r: r.first_s),
            decode_s=_times(dec, lambda r: r.total_s - r.first_s),
            step_s=Timing(tuple(t for r in dec for t in r.step_s)),
        ),
        prefill_token=pre[0].tokens[0],
        decode_tokens=dec[0].tokens,
        other_cores=busy,
    )


def _times(runs: list[Run], seconds: Callable[[Run], float]) -> Timing:
    return Timing(tuple(seconds(r) for r in runs))


def run(s: Settings, model_dir: Path) -> Report:
    host = host_info()
    corpus = Tokenizer(model_dir).encode(CORPUS)
    prompts, long = make_prompts(corpus, s.batch), long_prompt(corpus, s.prefill_len)
    results: list[LayoutResult] = []
    skipped: list[Skipped] = []
    for layout in s.layouts:
        log.info("layout %s (TP=%d, PP=%d)", name(layout), layout.tp, layout.pp)
        out = measure(s, model_dir, layout, prompts, long)
        if isinstance(out, Skipped):
            skipped.append(out)
        else:
            results.append(out)
    if not results or results[0].layout != "1x1":
        raise RuntimeError(f"the 1x1 baseline did not run: {skipped}")
    return Report(
        settings=s,
        host=host,
        source=source_state(("engine",)),
        model_dir=str(model_dir),
        results=results,
        skipped=skipped,
        loadavg_end=os.getloadavg(),
    )


# ---- the table ----------------------------------------------------------------------


def table(r: Report) -> str:
    s, h, base = r.settings, r.host, r.results[0]
    lines = [
        f"parallel benchmark: {s.model} fp32, {s.cpus} CPUs shared by a layout's ranks; "
        f"prefill {s.prefill_len} tokens, decode batch {s.batch} x {s.out_len} tokens; "
        f"{s.repeats} repeat(s); median [best]{' (--quick)' if s.quick else ''}",
        f"host: {h.cpu_model}, {h.cpu_count} CPUs, torch {h.torch}; load average "
        f"{h.loadavg[0]:.1f} at start, {r.loadavg_end[0]:.1f} at end",
        "x = layout median / 1x1 median; decode tok/s = B*(n-1) / (run - time to first token)",
        f"{'TPxPP':>5} {'thr':>3}  {'prefill tok/s':>18} {'x':>5}  {'decode tok/s':>18} "
        f"{'x':>5} {'step ms':>7}  {'same':>6} {'start s':>7} {'others':>6}",
    ]
    for res in r.results:
        pre, dec = res.prefill.tok_s, res.decode.decode_tok_s
        rows = zip(res.decode_tokens, base.decode_tokens, strict=True)
        same = f"{sum(a == b for a, b in rows)}/{len(res.decode_tokens)}"
        same += "+" if res.prefill_token == base.prefill_token else "-"
        lines.append(
            f"{res.layout:>5} {res.num_threads:>3}  {_rate(pre)} "
            f"{pre.median / base.prefill.tok_s.median:>5.2f}  {_rate(dec)} "
            f"{dec.median / base.decode.decode_tok_s.median:>5.2f} "
            f"{res.decode.step_s.median * 1e3:>7.1f}  {same:>6} {res.startup_s:>7.1f} "
            f"{res.other_cores:>6.2f}"
        )
    lines += [f"{sk.layout:>5} skipped: {sk.reason}" for sk in r.skipped]
    lines += [
        "step ms: median decode step (least disturbed by bursts of load). same: decode rows "
        "whose greedy tokens equal 1x1's, + if the prefill's token does too.",
        "start s: LLM(...) until every rank was ready. others: CPUs other processes kept "
        "busy meanwhile.",
    ]
    busiest = max(res.other_cores for res in r.results)
    if busiest > BUSY_CORES:
        lines.append(
            f"WARNING: the host was busy (other processes used up to {busiest:.2f} CPUs "
            "during a layout); the ratios are less reliable than on a quiet host."
        )
    return "\n".join(lines)


def _rate(rate: Rate) -> str:
    return f"{rate.median:8.1f} [{rate.best:7.1f}]"


def gpu_estimates() -> str:
    doc = __doc__ or ""
    return doc[doc.index("GPU estimates") :].strip()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="prefill 256, decode 4 x 16, 1 repeat")
    parser.add_argument(
        "--model",
        default="smollm2-135m-instruct",
        help="smollm2-135m-instruct, tiny (a random 4-layer Llama) or a model directory",
    )
    parser.add_argument(
        "--layouts",
        help=f"TPxPP layouts, comma-separated ({SMOLLM2_LAYOUTS}; tiny: {DEFAULT_LAYOUTS['tiny']})",
    )
    parser.add_argument("--threads", type=int, help="torch threads per rank (CPUs // ranks)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (3; quick: 1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON path ({RESULTS})")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    try:
        layouts = parse_layouts(args.layouts or DEFAULT_LAYOUTS.get(args.model, SMOLLM2_LAYOUTS))
    except ValueError as e:
        parser.error(str(e))
    settings = Settings(
        model=args.model,
        layouts=layouts,
        repeats=args.repeats or (1 if quick else 3),
        prefill_len=256 if quick else 512,
        batch=4 if quick else 8,
        out_len=16 if quick else 32,
        cpus=len(os.sched_getaffinity(0)),
        threads=args.threads,
        quick=quick,
    )
    if settings.repeats < 1 or (args.threads is not None and args.threads < 1):
        parser.error("--repeats and --threads must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    with tempfile.TemporaryDirectory(prefix="pdserve-parallel-") as tmp:
        if args.model == "tiny":
            from benchmarks.router_overhead import tiny_model  # imports the cluster stack

            model_dir = tiny_model(Path(tmp))
        else:
            model_dir = resolve_model(args.model)
        report = run(settings, model_dir)
    print(table(report))  # the benchmark's output
    print()
    print(gpu_estimates())
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
