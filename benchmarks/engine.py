"""Engine benchmark: pdserve's engine side by side with HF transformers `generate`.

    python -m benchmarks.engine [--quick] [--batches 1,8,32] [--threads 2] [--repeats 3]
                                [--profile] [--wait-quiet S]
                                [--out benchmarks/results/engine.json]

Both systems run in this one process, on the same weights (SmolLM2-135M-Instruct from
`resolve_model`, fp32), with the same torch thread count and the same token ids.

Decode. A batch of B prompts of 32-64 tokens (windows of a fixed English text, a
different length and offset per row) generates 64 greedy tokens per row: ours with
`ignore_eos`, HF with `min_new_tokens=64` on a left-padded batch. Each run is timed
end to end and split at the moment every row has its first token (ours: the engine's
stepwise API; HF: a streamer that timestamps each token), which gives
  * end-to-end output tok/s = B*64 / whole run (prefill included), and
  * decode-only tok/s = B*63 / (whole run - time to first token): the 63 decode steps,
    prefill excluded, measured inside the same run rather than by subtracting a
    separate prefill run.
Ours also records each decode step's time.

Prefill. One 1024-token prompt. Ours: one chunk (`max_num_batched_tokens` >= 1024)
and `max_tokens=1`, so the run is the prefill plus one LM-head row and a sample. HF:
one forward pass with `logits_to_keep=1` and the KV cache built (what `generate`
runs for its prefill) plus the argmax.

Roofline. Read bandwidth is a `sum()` over a 1 GiB fp32 buffer on the same threads,
measured at the start and the end of the run. A decode step reads every decoder
layer's weights, the final norm and the LM head (the tied embedding) once; those
bytes are summed from the loaded model. Batch-1 roofline tok/s = bandwidth / bytes,
using the best bandwidth sample (noise only ever lowers it).

Targets, each comparing one definition on both sides:
  * batch-1 decode-only tok/s >= 60% of the roofline;
  * batch-32 end-to-end output tok/s >= 2.5x HF's (the issue's "output tokens/s";
    a second row holds the decode-only ratio to the same goal, for information);
  * prefill tok/s (1024 tokens) >= HF's.
(With other --batches, the vs-HF target uses the largest batch run.) As a check that
both systems do the same work, the table counts the rows whose greedy tokens match.

Method: one untimed warm-up run of every configuration on each system, then
--repeats rounds that alternate which system goes first; the median is reported with
the best. Prefix caching is off so that repeated prompts are computed each time.
`--profile` adds torch.profiler tables of one decode step at the smallest and the
largest batch and of the prefill, for both systems.

On a shared host the numbers are only as steady as the host. Each section records
how many CPUs other processes kept busy while it ran (from /proc/stat), the table
warns when that was significant, and `--wait-quiet S` holds each timed run until
the host is quiet (for up to S seconds).
"""

from __future__ import annotations

import argparse
import functools
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import (
    Bandwidth,
    HostInfo,
    OpProfile,
    Rate,
    SourceState,
    Target,
    Timing,
    cpu_snapshot,
    host_info,
    other_cores,
    profile_ops,
    read_bandwidth,
    source_state,
    wait_for_quiet,
    write_json,
)
from benchmarks.engine_runs import (
    CORPUS,
    Agreement,
    DecodeResult,
    PrefillResult,
    Rounds,
    bench_decode,
    bench_prefill,
    long_prompt,
    make_prompts,
)
from benchmarks.engine_systems import HF, Ours, System
from engine import LLM, ModelConfig
from engine.model_source import resolve_model

log = logging.getLogger(__name__)

MODEL = "smollm2-135m-instruct"
RESULTS = Path(__file__).parent / "results" / "engine.json"
ROOFLINE_GOAL, BATCH_GOAL, PREFILL_GOAL = 0.60, 2.5, 1.0
BUSY_CORES = 0.25  # other processes' CPUs above which the table warns


def pooled(a: Bandwidth, b: Bandwidth) -> Bandwidth:
    return Bandwidth(a.kind, a.nbytes, a.threads, Timing(a.seconds.samples + b.seconds.samples))


# ---- the run ------------------------------------------------------------------------


@dataclass
class Settings:
    batches: list[int]
    threads: int
    repeats: int
    out_len: int
    prefill_len: int
    bandwidth_bytes: int
    profile: bool
    quick: bool
    wait_quiet_s: float  # before the run, and before each timed run


@dataclass
class Report:
    settings: Settings
    host: HostInfo
    source: SourceState  # the engine code measured
    model_dir: str
    weight_bytes_per_step: int
    hf_weight_bytes_per_step: int
    bandwidth: Bandwidth
    roofline_tok_s: float  # batch 1, from the best bandwidth sample
    decode: dict[int, dict[str, DecodeResult]]
    agreement: dict[int, Agreement]
    prefill: dict[str, PrefillResult]
    prefill_first_token_agrees: bool
    targets: list[Target]
    loadavg_end: tuple[float, float, float]
    other_cores: dict[str, float]  # CPUs other processes kept busy, per section
    hf_attn_implementation: str
    profiles: list[OpProfile] = field(default_factory=list)


def run(s: Settings) -> Report:
    from transformers import LlamaForCausalLM

    logging.getLogger("transformers").setLevel(logging.ERROR)
    torch.set_num_threads(s.threads)
    host = host_info(("transformers", "tokenizers"))
    bw_start = read_bandwidth(s.bandwidth_bytes, s.threads)
    log.info("read bandwidth %.1f GB/s", bw_start.gbps.median)

    model_dir = resolve_model(MODEL)
    largest = max(s.batches)
    max_model_len = max(2048, s.prefill_len + 64)
    # Room for the largest batch (prompts <= 64 tokens, a block of slack each) and for
    # one sequence of max_model_len, which the engine requires.
    kv_tokens = max(largest * (64 + s.out_len + 16 + 16), max_model_len + 16)
    kv_per_token = ModelConfig.from_dir(model_dir).kv_bytes_per_token(torch.float32)
    llm = LLM(
        MODEL,
        dtype="float32",
        num_threads=s.threads,
        enable_prefix_caching=False,
        max_num_seqs=largest,
        max_model_len=max_model_len,
        max_num_batched_tokens=max(s.prefill_len, 64 * largest),
        kv_cache_bytes=kv_tokens * kv_per_token,
    )
    corpus = llm.tokenizer.encode(CORPUS)
    hf_model: Any = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    hf_model.eval()
    torch.set_num_threads(s.threads)
    pad = hf_model.generation_config.pad_token_id
    if pad is None:
        pad = llm.engine.eos_token_ids[0]
    ours, hf = Ours(llm), HF(hf_model, int(pad))
    systems: list[System] = [ours, hf]

    weight_bytes, hf_bytes = ours.weight_bytes_per_step(), hf.weight_bytes_per_step()

    decode: dict[int, dict[str, DecodeResult]] = {}
    agreement: dict[int, Agreement] = {}
    contention: dict[str, float] = {}
    rounds = Rounds(s.repeats, s.wait_quiet_s)
    run_began = cpu_snapshot()
    for batch in s.batches:
        prompts = make_prompts(corpus, batch)
        began = cpu_snapshot()
        decode[batch], agreement[batch] = bench_decode(systems, prompts, s.out_len, rounds)
        contention[f"decode batch {batch}"] = other_cores(began)
        log.info(
            "batch %d: %s",
            batch,
            {k: f"{v.e2e_tok_s.median:.1f} tok/s" for k, v in decode[batch].items()},
        )

    prompt = long_prompt(corpus, s.prefill_len)
    began = cpu_snapshot()
    prefill = bench_prefill(systems, prompt, rounds)
    contention["prefill"] = other_cores(began)
    contention["whole run"] = other_cores(run_began)
    same_first = ours.prefill(prompt).tokens == hf.prefill(prompt).tokens

    bandwidth = pooled(bw_start, read_bandwidth(s.bandwidth_bytes, s.threads))
    roofline = bandwidth.gbps.best * 1e9 / weight_bytes
    report = Report(
        settings=s,
        host=host,
        source=source_state(("engine",)),
        model_dir=str(model_dir),
        weight_bytes_per_step=weight_bytes,
        hf_weight_bytes_per_step=hf_bytes,
        bandwidth=bandwidth,
        roofline_tok_s=roofline,
        decode=decode,
        agreement=agreement,
        prefill=prefill,
        prefill_first_token_agrees=same_first,
        targets=[],
        loadavg_end=host_info().loadavg,
        other_cores=contention,
        hf_attn_implementation=str(hf_model.config._attn_implementation),
    )
    report.targets = targets(report)
    if s.profile:
        report.profiles = profiles(systems, corpus, prompt, sorted({min(s.batches), largest}))
    return report


def profiles(
    systems: list[System], corpus: list[int], prompt: list[int], batches: list[int]
) -> list[OpProfile]:
    """Each system's decode step at each batch size, then each system's prefill."""
    out = []
    for batch in batches:
        rows = [corpus[i * 7 : i * 7 + 48] for i in range(batch)]  # equal lengths, for HF
        out += [system.profile_decode_step(rows) for system in systems]
    for system in systems:
        label = f"{system.name} prefill, {len(prompt)} tokens"
        out.append(profile_ops(label, functools.partial(system.prefill, prompt)))
    return out


def targets(r: Report) -> list[Target]:
    out = []
    if 1 in r.decode:
        out.append(
            Target(
                "batch-1 decode vs roofline",
                "decode-only tok/s (prefill excluded), median, over bandwidth/weight bytes",
                r.decode[1]["pdserve"].decode_tok_s.median,
                r.roofline_tok_s,
                ROOFLINE_GOAL,
            )
        )
    big = max(r.decode)
    if big > 1:
        ours, hf = r.decode[big]["pdserve"], r.decode[big]["hf"]
        out.append(
            Target(
                f"batch-{big} output tok/s vs HF",
                "end-to-end output tok/s (prefill included), median, same prompts",
                ours.e2e_tok_s.median,
                hf.e2e_tok_s.median,
                BATCH_GOAL,
            )
        )
        out.append(
            Target(
                "  the same, decode only",
                "decode-only tok/s (prefill excluded), median; not the issue's definition",
                ours.decode_tok_s.median,
                hf.decode_tok_s.median,
                BATCH_GOAL,
            )
        )
    out.append(
        Target(
            f"prefill {r.settings.prefill_len} tok vs HF",
            "prompt tok/s, median",
            r.prefill["pdserve"].tok_s.median,
            r.prefill["hf"].tok_s.median,
            PREFILL_GOAL,
        )
    )
    return out


# ---- the table ----------------------------------------------------------------------


def table(r: Report) -> str:
    s, h, bw = r.settings, r.host, r.bandwidth
    n = s.out_len
    lines = [
        f"engine benchmark: {MODEL} fp32, {s.threads} threads, {n} output tokens, "
        f"{s.repeats} repeats; median [best]{' (--quick)' if s.quick else ''}",
        f"host: {h.cpu_model}, {h.cpu_count} CPUs, torch {h.torch}, transformers "
        f"{h.packages.get('transformers')}; load average {h.loadavg[0]:.1f} at start, "
        f"{r.loadavg_end[0]:.1f} at end; other processes kept "
        f"{r.other_cores['whole run']:.2f} CPUs busy on average",
        f"read bandwidth (sum over {bw.nbytes >> 20} MiB fp32, {bw.threads} threads): "
        f"{bw.gbps.median:.1f} GB/s [{bw.gbps.best:.1f}]",
        f"weights read per decode step: {r.weight_bytes_per_step / 1e6:.1f} MB "
        f"(HF model: {r.hf_weight_bytes_per_step / 1e6:.1f} MB) -> batch-1 roofline "
        f"{r.roofline_tok_s:.1f} tok/s at the best bandwidth",
        "",
        f"decode: e2e = B*{n} / whole run (prefill included); decode = B*{n - 1} / (run - "
        "time to first token of every row);",
        "step = median time of one decode step (least disturbed by bursts of load); "
        "x = ours / HF in tok/s",
        f"{'batch':>5} {'prompt':>6}  {'system':<7} {'e2e tok/s':>15} {'decode tok/s':>15} "
        f"{'step ms':>8} | {'e2e x':>5} {'dec x':>5} {'step x':>6} | {'same':>5} {'others':>6}",
    ]
    for batch, res in r.decode.items():
        o, f, a = res["pdserve"], res["hf"], r.agreement[batch]
        ratios = (
            o.e2e_tok_s.median / f.e2e_tok_s.median,
            o.decode_tok_s.median / f.decode_tok_s.median,
            f.step_s.median / o.step_s.median,
        )
        for i, res_ in enumerate((o, f)):
            head = f"{batch:>5} {o.prompt_tokens:>6}" if i == 0 else " " * 12
            row = (
                f"{head}  {res_.system:<7} {_rate(res_.e2e_tok_s)} {_rate(res_.decode_tok_s)} "
                f"{res_.step_s.median * 1e3:>8.1f} |"
            )
            if i == 0:
                row += (
                    f" {ratios[0]:>5.2f} {ratios[1]:>5.2f} {ratios[2]:>6.2f} | "
                    f"{a.identical_rows:>2}/{a.rows:<2} "
                    f"{r.other_cores[f'decode batch {batch}']:>6.2f}"
                )
            lines.append(row)
    po, pf = r.prefill["pdserve"], r.prefill["hf"]
    lines += [
        "",
        f"prefill {s.prefill_len} tokens: ours {po.seconds.median:.3f} s "
        f"({_rate(po.tok_s).strip()} tok/s) | HF {pf.seconds.median:.3f} s "
        f"({_rate(pf.tok_s).strip()} tok/s) | {po.tok_s.median / pf.tok_s.median:.2f}x | "
        f"same first token: {'yes' if r.prefill_first_token_agrees else 'NO'} | "
        f"others {r.other_cores['prefill']:.2f}",
        "",
        f"{'target':<30} {'ours':>8} {'reference':>10} {'ratio':>6} {'goal':>7}  result",
    ]
    for t in r.targets:
        lines.append(
            f"{t.name:<30} {t.ours:>8.1f} {t.reference:>10.1f} {t.ratio:>6.2f} "
            f">={t.goal:<5.2f}  {'PASS' if t.passed else 'MISS'}  {t.definition}"
        )
    lines += [
        "same: rows whose greedy tokens equal HF's (fp32; HF's padded batches can flip near-ties).",
        "others: CPUs that other processes kept busy during that measurement.",
    ]
    busiest = max(r.other_cores.values())
    if busiest > BUSY_CORES:
        lines.append(
            f"WARNING: the host was busy (other processes used up to {busiest:.2f} "
            "CPUs during a measurement); the ratios are less reliable than on a "
            "quiet host, the absolute numbers more so."
        )
    for p in r.profiles:
        lines += ["", p.table()]
    return "\n".join(lines)


def _rate(rate: Rate) -> str:
    return f"{rate.median:7.1f} [{rate.best:5.1f}]"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small sizes for a smoke run (batches 1,4; 16 tokens; 256-token prefill; 2 repeats)",
    )
    parser.add_argument("--batches", help="decode batch sizes, comma-separated (1,8,32)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    parser.add_argument("--repeats", type=int, help="timed runs per measurement (3)")
    parser.add_argument(
        "--profile",
        action="store_true",
        help="add torch.profiler tables of decode steps and the prefill",
    )
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0.0,
        metavar="S",
        help="on a shared host: wait up to S seconds for other processes to go quiet "
        "before the run, and again before each timed run",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON path ({RESULTS})")
    args = parser.parse_args(argv)
    quick = bool(args.quick)
    settings = Settings(
        batches=[int(b) for b in (args.batches or ("1,4" if quick else "1,8,32")).split(",")],
        threads=args.threads,
        repeats=args.repeats or (2 if quick else 3),
        out_len=16 if quick else 64,
        prefill_len=256 if quick else 1024,
        bandwidth_bytes=(256 << 20) if quick else (1 << 30),
        profile=bool(args.profile),
        quick=quick,
        wait_quiet_s=args.wait_quiet,
    )
    if min(settings.batches) < 1 or settings.threads < 1 or settings.repeats < 1:
        parser.error("--batches, --threads and --repeats must be positive")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.wait_quiet > 0:
        log.info("other processes use %.2f CPUs", wait_for_quiet(args.wait_quiet))
    report = run(settings)
    print(table(report))  # the benchmark's output
    print(f"wrote {write_json(args.out, report)}")


if __name__ == "__main__":
    main()
