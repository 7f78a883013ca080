"""Engine benchmark: pdserve's engine side by side with HF transformers `generate`.

    python -m benchmarks.engine [--quick] [--batches 1,8,32] [--threads 2] [--repeats 3]
                                [--profile] [--wait-quiet S] [--march native,x86-64-v3]
                                [--peer-python /path/to/vllm-venv/bin/python]
                                [--out benchmarks/results/engine.json]

Both systems run in this one process, on the same weights (SmolLM2-135M-Instruct from
`resolve_model`, fp32), with the same torch thread count and the same token ids.
The engine runs on its defaults, so its CPU paths are the ones its load-time selection
picked (the table lists them with the selection's own timings).

`--march T1,T2` runs everything once per kernel build target, each in its own process
(`benchmarks/engine_isa.py`). `--peer-python` adds vLLM's CPU build, run offline from
that virtualenv on the same weights and sizes (`benchmarks/engine_peer.py`), once per
invocation, with fresh prompts for every timed run. Each run appends its figures to
`benchmarks/engine_results.jsonl`.

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
  * batch-32 end-to-end output tok/s >= 2.5x HF's ("output tokens/s"; a second row
    holds the decode-only ratio to the same goal, for information);
  * prefill tok/s (1024 tokens) >= HF's, and >= vLLM's when the peer runs;
  * per row class the selection measured, the chosen matmul path no slower than
    oneDNN (the selection's own timings, at load or from its cache).
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
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, cast

import torch

from benchmarks.common import (
    Bandwidth,
    OpProfile,
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
from benchmarks.engine_isa import append_history, isa_class, run_per_march, without_flags
from benchmarks.engine_peer import load_peer, run_peer
from benchmarks.engine_report import (
    MODEL,
    Report,
    Selection,
    Settings,
    history_record,
    table,
    targets,
)
from benchmarks.engine_runs import (
    CORPUS,
    Agreement,
    DecodeResult,
    Rounds,
    bench_decode,
    bench_prefill,
    long_prompt,
    make_prompts,
)
from benchmarks.engine_systems import HF, Ours, System
from engine import LLM, ModelConfig
from engine.cpu_linear import RoutedLinear
from engine.kernel_build import MARCH_ENV
from engine.model import DecoderLayer
from engine.model_source import resolve_model

log = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results" / "engine.json"


def pooled(a: Bandwidth, b: Bandwidth) -> Bandwidth:
    return Bandwidth(a.kind, a.nbytes, a.threads, Timing(a.seconds.samples + b.seconds.samples))


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

    peer = None
    if s.peer_json is not None:
        peer = load_peer(s.peer_json, s.out_len)
    elif s.peer_python is not None:
        peer = run_peer(
            s.peer_python, model_dir, corpus, s.batches, s.out_len, s.prefill_len,
            s.repeats, s.threads,
        )  # fmt: skip
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
        selection=selection_of(llm),
        peer=peer,
    )
    report.targets = targets(report)
    if s.profile:
        report.profiles = profiles(systems, corpus, prompt, sorted({min(s.batches), largest}))
    return report


_PATH_NAMES = {"NativeLinear": "native", "OneDnnLinear": "onednn", "Linear": "plain"}


def selection_of(llm: LLM) -> Selection:
    model = llm.engine.runner.model
    march = os.environ.get(MARCH_ENV) or "native"
    layer = cast(DecoderLayer, model.layers[0])
    linear = layer.mlp.gate_up_proj
    route = linear.route if isinstance(linear, RoutedLinear) else None
    paths = (
        ", ".join(f"{c} {p}" for c, p in route.items())
        if route is not None
        else _PATH_NAMES.get(type(linear).__name__, type(linear).__name__)
    )
    return Selection(
        march,
        isa_class(march),
        model.linear_choice,
        model.fused_choice,
        model.fused_rows if model.fused_decode is not None else (False, False),
        paths,
    )


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
    parser.add_argument(
        "--march",
        help="kernel build targets, comma-separated (e.g. native,x86-64-v3): one run "
        f"each, in its own process with ${MARCH_ENV} set",
    )
    parser.add_argument(
        "--peer-python",
        metavar="PATH",
        help="the python of a virtualenv with vLLM's CPU build: run it side by side",
    )
    parser.add_argument("--peer-json", type=Path, help=argparse.SUPPRESS)  # from --march
    parser.add_argument("--out", type=Path, default=RESULTS, help=f"JSON path ({RESULTS})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.march:
        sys.exit(_per_march(args, list(sys.argv[1:] if argv is None else argv)))
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
        peer_python=args.peer_python,
        peer_json=args.peer_json,
    )
    if min(settings.batches) < 1 or settings.threads < 1 or settings.repeats < 1:
        parser.error("--batches, --threads and --repeats must be positive")
    if args.wait_quiet > 0:
        log.info("other processes use %.2f CPUs", wait_for_quiet(args.wait_quiet))
    report = run(settings)
    print(table(report))  # the benchmark's output
    print(f"wrote {write_json(args.out, report)}")
    print(f"appended to {append_history(history_record(report))}")


def _per_march(args: argparse.Namespace, argv: list[str]) -> int:
    """Run the peer (if asked) once here, then the benchmark once per target."""
    marches = [m.strip() for m in args.march.split(",") if m.strip()]
    child = without_flags(argv, ("--march", "--peer-python", "--peer-json", "--out"))
    out_dir = args.out.parent
    with tempfile.TemporaryDirectory() as tmp:
        if args.peer_python:
            from engine.tokenizer import Tokenizer

            model_dir = resolve_model(MODEL)
            corpus = Tokenizer(model_dir).encode(CORPUS)
            quick = bool(args.quick)
            batches = [int(b) for b in (args.batches or ("1,4" if quick else "1,8,32")).split(",")]
            saved = Path(tmp) / "peer.json"
            run_peer(
                args.peer_python, model_dir, corpus, batches, 16 if quick else 64,
                256 if quick else 1024, args.repeats or (2 if quick else 3), args.threads,
                save_to=saved,
            )  # fmt: skip
            child += ["--peer-json", str(saved)]
        return run_per_march(marches, child, out_dir)


if __name__ == "__main__":
    main()
