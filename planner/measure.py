"""Measuring a profile on this machine: the real engine's step times for each TP/PP
layout, and the KV transfer's time against bytes (`planner.measure_kv`).

    profile = measure(ProfileSpec(model="smollm2-135m-instruct", shapes=((1, 1),)))

Prefill: for each (prompt tokens, batch) of the grid, `batch` distinct random prompts
asking for one token go in together and the engine steps until they are done (the
step budget holds the whole batch, so that is one step); best of `repeats`.
Decode: for each (batch, context), `batch` prompts of `context` tokens are prefilled,
then `decode_steps` decode steps are timed one by one; the median counts. Prefix
caching is off, so every prompt is computed. A TP/PP layout starts its other ranks as
local processes (`engine.LLM`), which share this machine's cores.
"""

from __future__ import annotations

import logging
import platform
import random
import statistics
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import torch

from engine import LLM, SamplingParams
from engine.config import ModelConfig, parse_dtype
from engine.model_source import resolve_model
from planner.measure_kv import measure_transfer
from planner.profile import (
    DecodePoint,
    LayoutProfile,
    PrefillPoint,
    Profile,
    TransferProfile,
    fit_decode,
    fit_prefill,
    fit_transfer,
)

log = logging.getLogger(__name__)

FIRST_ORDINARY_ID = 1000


@dataclass(frozen=True)
class ProfileSpec:
    model: str = "smollm2-135m-instruct"
    dtype: str = "float32"
    device: str = "cpu"
    shapes: tuple[tuple[int, int], ...] = ((1, 1),)
    num_threads: int | None = None  # per rank; None: the cores / ranks
    block_size: int = 16
    transport: str | None = "torch_dist"  # None: no transfer profile
    prefill_tokens: tuple[int, ...] = (32, 128, 512, 1024)
    prefill_batches: tuple[int, ...] = (1, 2)
    decode_batches: tuple[int, ...] = (1, 4, 16)
    decode_contexts: tuple[int, ...] = (128, 512)
    decode_steps: int = 5
    repeats: int = 2
    transfer_tokens: tuple[int, ...] = (16, 256, 1024, 4096)

    def __post_init__(self) -> None:
        grids = {
            "shapes": self.shapes,
            "prefill_tokens": self.prefill_tokens,
            "prefill_batches": self.prefill_batches,
            "decode_batches": self.decode_batches,
            "decode_contexts": self.decode_contexts,
        }
        for name, values in grids.items():
            if not values:
                raise ValueError(f"{name}: must not be empty")
        if self.decode_steps < 1 or self.repeats < 1:
            raise ValueError("decode_steps and repeats must be >= 1")

    def threads(self, tp: int, pp: int) -> int:
        if self.num_threads is not None:
            return self.num_threads
        return max(1, (torch.get_num_threads() or 1) // (tp * pp))


def kv_bytes_per_token(model: ModelConfig, dtype: str) -> int:
    element = torch.empty((), dtype=parse_dtype(dtype)).element_size()
    return 2 * model.num_layers * model.num_kv_heads * model.head_dim * element


def measure(spec: ProfileSpec) -> Profile:
    model_dir = resolve_model(spec.model)
    mc = ModelConfig.from_dir(model_dir)
    layouts = [measure_layout(spec, mc, tp, pp) for tp, pp in spec.shapes]
    transfer = None
    if spec.transport is not None:
        per_token = kv_bytes_per_token(mc, spec.dtype)
        points = measure_transfer(
            spec.transport,
            [n * per_token for n in spec.transfer_tokens],
            mc.num_layers,
            spec.repeats,
        )
        transfer = TransferProfile(
            transport=spec.transport,
            method=_TRANSFER_METHOD[spec.transport],
            points=points,
            fit=fit_transfer(points),
        )
    return Profile(
        model=spec.model,
        dtype=spec.dtype,
        device=f"{spec.device} ({platform.machine()}, {torch.get_num_threads()} threads)",
        created=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        kv_bytes_per_token=kv_bytes_per_token(mc, spec.dtype),
        layouts=layouts,
        transfer=transfer,
    )


_TRANSFER_METHOD = {
    "torch_dist": "a Gloo pair between two processes, one message per layer, from the "
    "sender's go to the last layer received (no header, checksum or block landing)",
    "shm": "one single-thread copy of the bytes (the shared segment's landing copy), "
    "without the header or the receiver's polling",
}


def measure_layout(spec: ProfileSpec, mc: ModelConfig, tp: int, pp: int) -> LayoutProfile:
    budget = max(
        max(spec.prefill_tokens) * max(spec.prefill_batches),
        max(spec.decode_contexts) * max(spec.decode_batches),
    )
    longest = max(max(spec.prefill_tokens), max(spec.decode_contexts)) + spec.decode_steps + 8
    kv_tokens = budget + max(spec.decode_batches) * (spec.decode_steps + 8 + spec.block_size)
    threads = spec.threads(tp, pp)
    llm = LLM(
        spec.model,
        dtype=spec.dtype,
        device=spec.device,
        tp=tp,
        pp=pp,
        num_threads=threads,
        block_size=spec.block_size,
        kv_cache_bytes=kv_tokens * kv_bytes_per_token(mc, spec.dtype) + (16 << 20),
        max_num_batched_tokens=budget,
        max_num_seqs=max(max(spec.prefill_batches), max(spec.decode_batches)),
        max_model_len=longest,
        enable_prefix_caching=False,
    )
    rng = random.Random(0)
    try:
        bench = _Bench(llm, mc.vocab_size, rng)
        bench.prefill(64, 1)  # warm-up: kernels, allocator
        prefill = [
            PrefillPoint(
                tokens=n, batch=b, seconds=min(bench.prefill(n, b) for _ in range(spec.repeats))
            )
            for n in spec.prefill_tokens
            for b in spec.prefill_batches
        ]
        decode = [
            DecodePoint(batch=b, context=c, seconds=bench.decode(c, b, spec.decode_steps))
            for c in spec.decode_contexts
            for b in spec.decode_batches
        ]
    finally:
        llm.close()
    log.info(
        "profiled tp=%d pp=%d: %d prefill and %d decode points", tp, pp, len(prefill), len(decode)
    )
    return LayoutProfile(
        tp=tp,
        pp=pp,
        num_threads=threads,
        prefill_points=prefill,
        decode_points=decode,
        prefill=fit_prefill(prefill),
        decode=fit_decode(decode),
    )


class _Bench:
    def __init__(self, llm: LLM, vocab: int, rng: random.Random) -> None:
        self.engine, self.vocab, self.rng = llm.engine, vocab, rng
        self.ids = 0

    def _add(self, tokens: int, max_tokens: int) -> str:
        self.ids += 1
        rid = f"profile-{self.ids}"
        prompt = [self.rng.randrange(FIRST_ORDINARY_ID, self.vocab) for _ in range(tokens)]
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
        self.engine.add_request(rid, prompt, params)
        return rid

    def prefill(self, tokens: int, batch: int) -> float:
        for _ in range(batch):
            self._add(tokens, 1)
        began = time.perf_counter()
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return time.perf_counter() - began

    def decode(self, context: int, batch: int, steps: int) -> float:
        rids = {self._add(context, steps + 2) for _ in range(batch)}
        started: set[str] = set()
        while started != rids:  # prefill all of them (and their first token)
            started |= {o.request_id for o in self.engine.step() if o.token_ids}
        times = []
        for _ in range(steps):
            began = time.perf_counter()
            outs = self.engine.step()
            times.append(time.perf_counter() - began)
            if len(outs) != batch:
                raise RuntimeError(f"decode step ran {len(outs)} sequences, expected {batch}")
        for rid in rids:
            self.engine.abort_request(rid)
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return statistics.median(times)
