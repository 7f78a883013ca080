"""The engine benchmark's report: settings, figures, targets, the table, the history line.

`benchmarks/engine.py` measures and fills a `Report`; this module judges it against
the targets (see that module's docstring) and renders it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.common import Bandwidth, HostInfo, OpProfile, Rate, SourceState, Target
from benchmarks.engine_peer import PeerResult
from benchmarks.engine_runs import Agreement, DecodeResult, PrefillResult
from engine.linear_choice import Choice

MODEL = "smollm2-135m-instruct"
ROOFLINE_GOAL, BATCH_GOAL, PREFILL_GOAL = 0.60, 2.5, 1.0
BUSY_CORES = 0.25  # other processes' CPUs above which the table warns


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
    peer_python: str | None = None  # runs the vLLM peer after our measurements
    peer_json: Path | None = None  # or: the peer's answer from a run already made


@dataclass(frozen=True)
class Selection:
    """The engine's CPU paths as its load-time selection left them."""

    march: str
    isa: str
    linear: Choice | None
    fused: Choice | None
    fused_rows: tuple[bool, bool]
    paths: str  # what the first decoder layer's matmuls run, in words


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
    selection: Selection
    peer: PeerResult | None = None
    profiles: list[OpProfile] = field(default_factory=list)


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
    return out + peer_targets(r, big) + selection_targets(r.selection)


def peer_targets(r: Report, big: int) -> list[Target]:
    if r.peer is None:
        return []
    out = [
        Target(
            f"prefill {r.settings.prefill_len} tok vs vLLM",
            "prompt tok/s, median; vLLM on a fresh prompt each run",
            r.prefill["pdserve"].tok_s.median,
            r.peer.prefill.tok_s.median,
            PREFILL_GOAL,
        )
    ]
    for batch in sorted({min(r.decode), big}):
        if batch in r.peer.decode:
            out.append(
                Target(
                    f"batch-{batch} output tok/s vs vLLM",
                    "end-to-end output tok/s, median (for information)",
                    r.decode[batch]["pdserve"].e2e_tok_s.median,
                    r.peer.decode[batch].e2e_tok_s.median,
                    1.0,
                )
            )
    return out


def selection_targets(sel: Selection) -> list[Target]:
    """Per class: oneDNN's time over the chosen path's, as the selection measured."""
    if sel.linear is None:
        return []
    out = []
    for cls, times in sel.linear.seconds.items():
        chosen = sel.linear.picked[cls]
        if "onednn" in times and chosen in times:
            out.append(
                Target(
                    f"{cls} rows: {chosen} vs oneDNN",
                    "the selection's timing of the model's matmuls (1/s)"
                    + (", cached" if sel.linear.from_cache else ""),
                    1 / times[chosen],
                    1 / times["onednn"],
                    1.0,
                )
            )
    return out


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
        f"kernels: -march={r.selection.march} ({r.selection.isa}); matmuls: "
        f"{r.selection.paths}; fused decode layers (1 row, more): {r.selection.fused_rows}",
        *_choice_lines(r.selection),
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
    lines += _peer_rows(r)
    po, pf = r.prefill["pdserve"], r.prefill["hf"]
    lines += [
        "",
        f"prefill {s.prefill_len} tokens: ours {po.seconds.median:.3f} s "
        f"({_rate(po.tok_s).strip()} tok/s) | HF {pf.seconds.median:.3f} s "
        f"({_rate(pf.tok_s).strip()} tok/s) | {po.tok_s.median / pf.tok_s.median:.2f}x | "
        f"same first token: {'yes' if r.prefill_first_token_agrees else 'NO'} | "
        f"others {r.other_cores['prefill']:.2f}",
        *(
            [
                f"prefill {s.prefill_len} tokens: vLLM {r.peer.prefill.seconds.median:.3f} s "
                f"({_rate(r.peer.prefill.tok_s).strip()} tok/s) | ours "
                f"{po.tok_s.median / r.peer.prefill.tok_s.median:.2f}x"
            ]
            if r.peer is not None
            else []
        ),
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


def _choice_lines(sel: Selection) -> list[str]:
    out = []
    for what, choice in (("matmul path", sel.linear), ("fused decode", sel.fused)):
        if choice is not None:
            src = "from the cache" if choice.from_cache else "measured at load"
            out.append(f"  selection ({what}, {src}): {choice.describe()}")
    return out


def _peer_rows(r: Report) -> list[str]:
    if r.peer is None:
        return []
    out = [f"vLLM (offline, {r.peer.python}); x = ours / vLLM, e2e tok/s"]
    for batch, res in sorted(r.peer.decode.items()):
        if batch not in r.decode:
            continue
        ours = r.decode[batch]["pdserve"]
        out.append(
            f"{batch:>5} {res.prompt_tokens:>6}  {'vllm':<7} {_rate(res.e2e_tok_s)} "
            f"{_rate(res.decode_tok_s)} {res.step_s.median * 1e3:>8.1f} | "
            f"{ours.e2e_tok_s.median / res.e2e_tok_s.median:>5.2f} "
            f"{ours.decode_tok_s.median / res.decode_tok_s.median:>5.2f}"
        )
    return out


def _rate(rate: Rate) -> str:
    return f"{rate.median:7.1f} [{rate.best:5.1f}]"


def history_record(r: Report) -> dict[str, Any]:
    """The run's headline figures, for benchmarks/engine_results.jsonl."""
    big = max(r.decode)
    sel = r.selection
    return {
        "march": sel.march,
        "isa": sel.isa,
        "cpu": r.host.cpu_model,
        "threads": r.settings.threads,
        "repeats": r.settings.repeats,
        "quick": r.settings.quick,
        "commit": r.source.commit,
        "modified": list(r.source.modified),
        "paths": sel.paths,
        "fused_rows": list(sel.fused_rows),
        "other_cpus": round(r.other_cores["whole run"], 2),
        "roofline_tok_s": round(r.roofline_tok_s, 1),
        "decode": {
            str(b): {
                name: round(res.e2e_tok_s.median, 1)
                for name, res in [*sorted(v.items()), *_peer_decode(r, b)]
            }
            for b, v in r.decode.items()
        },
        "batch1_decode_only_tok_s": round(
            r.decode[min(r.decode)]["pdserve"].decode_tok_s.median, 1
        ),
        "prefill_tok_s": {
            "tokens": r.settings.prefill_len,
            **{n: round(p.tok_s.median, 1) for n, p in r.prefill.items()},
            **({"vllm": round(r.peer.prefill.tok_s.median, 1)} if r.peer else {}),
        },
        "targets": {t.name.strip(): [round(t.ratio, 3), t.goal, t.passed] for t in r.targets},
        "batch_largest": big,
    }


def _peer_decode(r: Report, batch: int) -> list[tuple[str, DecodeResult]]:
    if r.peer is None or batch not in r.peer.decode:
        return []
    return [("vllm", r.peer.decode[batch])]
