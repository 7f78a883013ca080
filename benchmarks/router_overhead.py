"""Router overhead: the latency the serving path adds on top of the engine, per request.

    python -m benchmarks.router_overhead [--model smollm2-135m-instruct | --tiny]
                                         [--requests 30] [--short 16] [--long 160]
                                         [--max-tokens 4] [--threshold 64] [--colocated]
                                         [--set KEY=VALUE ...]

The same prompts (random token ids, a fresh prompt per request, so no prefix-cache hit
helps either side) run twice, one request at a time:

* direct: an `LLMEngine` in this process, with the pools' engine settings and one torch
  thread; TTFT is from `add_request` to the step that returns the first token;
* cluster: `pdserve up`'s cluster on local Ray (embedded Redis, 1 prefill + 1 decode
  replica, the router on Serve's proxies), called with the gRPC client; TTFT is from
  sending the request to receiving the first token.

Short prompts stay below the disaggregation threshold (the colocated path: router ->
decode replica); long ones go router -> decode and prefill at once (the prefill computes
and pushes the KV and first token into the blocks the decode replica holds) -> decode.
With `--colocated` the cluster has one colocated pool and no prefill pool,
the baseline the disaggregated setup is compared with: every prompt stays local.
Reported per prompt set: p50 TTFT of both, the added latency (cluster p50 minus direct
p50) and, per request, the server's TTFT breakdown (queue, prefill, KV transfer) with
`client - prefill - kv`, the time that is neither compute nor transfer.

The direct call, Serve's floor and the cluster call of one prompt run back to back, so
that the machine's other work at that moment weighs on all three alike.

Baseline in the same run: Serve's floor (benchmarks/serve_floor.py), two trivial
deployments next to the cluster on the same proxies, called right before each cluster
request: the gRPC proxy, an ingress replica and one streaming handle hop, with no
routing, engine or transfer. "Beyond the floor" is the added latency minus the floor:
what pdserve's own code and the engine's slowdown inside the cluster add.

Target: p50 latency beyond Serve's floor of at most 5 ms, for both prompt sets. It
prints a table and writes JSON to benchmarks/results/. On a shared machine, run it twice.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import random
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks import serve_floor
from cluster.client import Client, Sampling, Timings
from cluster.config import ClusterConfig
from cluster.config_file import load_config
from cluster.launcher import Launcher
from engine import EngineConfig, LLMEngine, SamplingParams
from engine.model_source import resolve_model

logger = logging.getLogger(__name__)

RESULTS = Path(__file__).parent / "results"
KV_CACHE = "128MiB"
MAX_MODEL_LEN = 1024
TARGET_BEYOND_FLOOR_MS = 5.0


@dataclass(frozen=True)
class Sample:
    prompt_set: str  # short | long
    prompt_tokens: int
    direct_ttft_ms: float
    client_ttft_ms: float
    floor_ttft_ms: float  # Serve's floor, called just before this request
    server_ttft_ms: float
    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    mean_tpot_ms: float
    disaggregated: bool

    @property
    def path(self) -> str:
        return "disaggregated" if self.disaggregated else "colocated"

    @property
    def added_ms(self) -> float:
        return self.client_ttft_ms - self.direct_ttft_ms

    @property
    def outside_engine_ms(self) -> float:
        return self.client_ttft_ms - self.prefill_ms - self.kv_transfer_ms


def tiny_model(out: Path) -> Path:
    """A random 4-layer Llama with SmolLM2's tokenizer (the tests' tiny model)."""
    import shutil

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg: dict[str, Any] = {
        "vocab_size": 49152, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "max_position_embeddings": 2048, "tie_word_embeddings": True,
        "bos_token_id": 1, "eos_token_id": 2,
    }  # fmt: skip
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(**cfg)).save_pretrained(str(out))
    smol = resolve_model("smollm2-135m-instruct")
    for name in os.listdir(smol):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(smol / name, out / name)
    return out


def prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab) for _ in range(length)] for _ in range(n)]


def direct_engine(model_dir: str) -> LLMEngine:
    """An engine in this process with the pools' engine settings and one torch thread."""
    return LLMEngine(
        EngineConfig(
            model=model_dir, num_threads=1, kv_cache_bytes=128 << 20, max_model_len=MAX_MODEL_LEN
        )
    )


def direct_ttft_ms(engine: LLMEngine, rid: str, ids: list[int], max_tokens: int) -> float:
    """Milliseconds from `add_request` to the step that returns the first token; the
    request then runs to its end, as in the cluster."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    engine.add_request(rid, ids, params)
    first = None
    while engine.has_unfinished_requests():
        for o in engine.step():
            if first is None and o.new_token_ids:
                first = time.perf_counter()
    assert first is not None
    return (first - start) * 1000


def cluster_config(
    model: str, threshold: int, colocated: bool, overrides: tuple[str, ...] = ()
) -> ClusterConfig:
    pools = (
        [f"pools=[{{name: main, role: colocated, engine: {{kv_cache_bytes: {KV_CACHE}}}}}]"]
        if colocated
        else [
            f"pools.prefill.engine.kv_cache_bytes={KV_CACHE}",
            f"pools.decode.engine.kv_cache_bytes={KV_CACHE}",
        ]
    )
    return load_config(
        None,
        [
            "name=bench-overhead",
            f"model.source={model}",
            f"model.max_model_len={MAX_MODEL_LEN}",
            *pools,
            f"router.disaggregation_threshold={threshold}",
            *overrides,
        ],
    )


def run_cluster(
    client: Client, floor: Client, engine: LLMEngine, batch: list[list[int]], max_tokens: int
) -> list[tuple[float, float, float, Timings]]:
    """(direct TTFT, client TTFT, Serve floor TTFT, server timings) per prompt, in ms.

    The three calls of one prompt run back to back, so that whatever else the machine
    does at that moment weighs on all of them alike."""
    sampling = Sampling(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    out = []
    for i, ids in enumerate([batch[0][::-1], *batch]):  # a warm-up prompt first
        floor_ms = serve_floor.ttft_ms(floor, ids, max_tokens)
        direct_ms = direct_ttft_ms(engine, f"direct-{len(ids)}-{i}", ids, max_tokens)
        start = time.perf_counter()
        first = None
        last = None
        for chunk in client.stream(token_ids=ids, sampling=sampling):
            if first is None and chunk.token_ids:
                first = time.perf_counter()
            last = chunk
        assert first is not None and last is not None and last.timings is not None
        if i:
            out.append((direct_ms, (first - start) * 1000, floor_ms, last.timings))
    return out


def make_sample(
    name: str, n: int, direct_ms: float, client_ms: float, floor_ms: float, t: Timings
) -> Sample:
    return Sample(
        prompt_set=name,
        prompt_tokens=n,
        direct_ttft_ms=direct_ms,
        client_ttft_ms=client_ms,
        floor_ttft_ms=floor_ms,
        server_ttft_ms=t.ttft_ms,
        queue_ms=t.queue_ms,
        prefill_ms=t.prefill_ms,
        kv_transfer_ms=t.kv_transfer_ms,
        mean_tpot_ms=t.mean_tpot_ms,
        disaggregated=t.disaggregated,
    )


def summarize(samples: list[Sample]) -> dict[str, Any]:
    def p50(xs: list[float]) -> float:
        return statistics.median(xs)

    out: dict[str, Any] = {}
    for name in ("short", "long"):
        ss = [s for s in samples if s.prompt_set == name]
        if not ss:
            continue
        direct = p50([s.direct_ttft_ms for s in ss])
        client = p50([s.client_ttft_ms for s in ss])
        floor = p50([s.floor_ttft_ms for s in ss])
        out[name] = {
            "requests": len(ss),
            "prompt_tokens": ss[0].prompt_tokens,
            "disaggregated": sum(s.disaggregated for s in ss),
            "direct_ttft_p50_ms": direct,
            "client_ttft_p50_ms": client,
            "added_p50_ms": client - direct,
            "serve_floor_p50_ms": floor,
            "beyond_floor_p50_ms": client - direct - floor,
            "outside_engine_p50_ms": p50([s.outside_engine_ms for s in ss]),
            "queue_p50_ms": p50([s.queue_ms for s in ss]),
            "prefill_p50_ms": p50([s.prefill_ms for s in ss]),
            "kv_transfer_p50_ms": p50([s.kv_transfer_ms for s in ss]),
            "server_ttft_p50_ms": p50([s.server_ttft_ms for s in ss]),
            "mean_tpot_p50_ms": p50([s.mean_tpot_ms for s in ss]),
        }
    for name in ("short", "long"):
        if name in out:
            out[name]["target_met"] = out[name]["beyond_floor_p50_ms"] <= TARGET_BEYOND_FLOOR_MS
    out["target_beyond_floor_ms"] = TARGET_BEYOND_FLOOR_MS
    return out


def print_report(samples: list[Sample], summary: dict[str, Any]) -> None:
    print("\nper request (ms): client TTFT = queue + prefill + kv + hops to the client")
    print(
        f"{'path':<14}{'direct':>9}{'client':>9}{'added':>8}{'floor':>8}{'queue':>8}"
        f"{'prefill':>9}{'kv':>7}{'server':>8}"
    )
    for s in samples:
        print(
            f"{s.path:<14}{s.direct_ttft_ms:9.2f}{s.client_ttft_ms:9.2f}{s.added_ms:8.2f}"
            f"{s.floor_ttft_ms:8.2f}{s.queue_ms:8.2f}{s.prefill_ms:9.2f}{s.kv_transfer_ms:7.2f}{s.server_ttft_ms:8.2f}"
        )
    print("\nsummary (p50, ms)")
    for name in ("short", "long"):
        if name not in summary:
            continue
        r = summary[name]
        print(
            f"{name:<6} {r['prompt_tokens']:>4} prompt tokens, "
            f"{r['disaggregated']}/{r['requests']} disaggregated: "
            f"direct {r['direct_ttft_p50_ms']:.2f}, "
            f"cluster {r['client_ttft_p50_ms']:.2f}, added {r['added_p50_ms']:.2f} "
            f"= Serve's floor {r['serve_floor_p50_ms']:.2f} + beyond it "
            f"{r['beyond_floor_p50_ms']:.2f} "
            f"(outside the engine {r['outside_engine_p50_ms']:.2f}; queue {r['queue_p50_ms']:.2f}, "
            f"prefill {r['prefill_p50_ms']:.2f}, kv {r['kv_transfer_p50_ms']:.2f})"
        )
    for name in ("short", "long"):
        if name in summary:
            verdict = "met" if summary[name]["target_met"] else "NOT met"
            print(
                f"target: {name} prompts' p50 latency beyond Serve's floor <= "
                f"{TARGET_BEYOND_FLOOR_MS} ms: {verdict}"
            )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.router_overhead", description=__doc__
    )
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tiny", action="store_true", help="a random 4-layer model instead")
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--short", type=int, default=16, help="prompt tokens of the colocated set")
    parser.add_argument(
        "--long", type=int, default=160, help="prompt tokens of the disaggregated set"
    )
    parser.add_argument("--max-tokens", type=int, default=4)
    parser.add_argument("--threshold", type=int, default=64)
    parser.add_argument("--colocated", action="store_true", help="one colocated pool, no prefill")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a cluster config override, as `pdserve up --set` takes (repeatable)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if not args.short < args.threshold <= args.long:
        parser.error("need --short < --threshold <= --long")

    with tempfile.TemporaryDirectory(prefix="pdserve-bench-") as tmp:
        model_dir = str(tiny_model(Path(tmp)) if args.tiny else resolve_model(args.model))
        from engine.config import ModelConfig

        vocab = ModelConfig.from_dir(model_dir).vocab_size
        sets = {
            "short": prompts(args.requests, args.short, vocab, 1),
            "long": prompts(args.requests, args.long, vocab, 2),
        }
        print(f"direct engine: {model_dir}")
        engine = direct_engine(model_dir)

        config = cluster_config(model_dir, args.threshold, args.colocated, tuple(args.overrides))
        launcher = Launcher(config, echo=lambda m: print(f"  {m}", flush=True))
        launcher.start()
        samples: list[Sample] = []
        try:
            serve_floor.deploy()
            with (
                Client(launcher.grpc_target) as client,
                Client(launcher.grpc_target, application=serve_floor.APPLICATION) as floor,
            ):
                for name, batch in sets.items():
                    runs = run_cluster(client, floor, engine, batch, args.max_tokens)
                    for direct_ms, client_ms, floor_ms, t in runs:
                        samples.append(
                            make_sample(name, len(batch[0]), direct_ms, client_ms, floor_ms, t)
                        )
            serve_floor.remove()
        finally:
            launcher.stop()

    summary = summarize(samples)
    print_report(samples, summary)
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = RESULTS / f"router_overhead-{stamp}.json"
    record = {
        "benchmark": "router_overhead",
        "when": stamp,
        "host": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "args": vars(args),
        "model_dir": model_dir,
        "summary": summary,
        "samples": [asdict(s) | {"path": s.path, "added_ms": s.added_ms} for s in samples],
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
