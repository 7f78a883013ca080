"""Greedy fp32 output is token-identical to HF transformers on the same weights.

Run one by one, and batched with mixed lengths under a small token budget that
forces chunked prefill. A divergence passes only at a measured near-tie.
"""

from __future__ import annotations

import random

import pytest
import torch
from cpu_targets import has_avx2
from hf_reference import assert_matches, hf_greedy

from engine import SamplingParams
from engine.cpu_kernels import CpuKernels
from engine.cpu_linear import NativeLinear
from engine.kernel_build import build_library

GREEDY = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _tiny_prompts() -> list[list[int]]:
    rng = random.Random(7)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (1, 5, 17, 33, 130, 1100)]


def test_tiny_matches_hf_one_by_one(make_llm, tiny_model_dir, tiny_hf) -> None:
    llm = make_llm(tiny_model_dir)
    for i, prompt in enumerate(_tiny_prompts()):
        ref = hf_greedy(tiny_hf, prompt, GREEDY.max_tokens)
        (out,) = llm.generate([prompt], GREEDY)
        assert_matches(out.token_ids, ref, f"prompt {i} (len {len(prompt)})")


# CPU paths: "auto" runs what measured fastest on this host per row class, "native"
# the native kernels (decode-only steps fused per layer), "per-op" the native kernels
# op by op (as under TP), "onednn" and "plain" torch ops; on x86 hosts with AVX2,
# "x86-64-v3" runs "native" on kernels built for AVX2 without AVX-512, the code path
# of most x86 servers that lack it.
CPU_PATHS = ["auto", "native", "per-op", "onednn", "plain"] + (["x86-64-v3"] if has_avx2() else [])


@pytest.mark.parametrize("path", CPU_PATHS)
@pytest.mark.parametrize("budget", [7, 64])
def test_tiny_matches_hf_batched_chunked(make_llm, tiny_model_dir, tiny_hf, budget, path) -> None:
    prompts = _tiny_prompts()
    refs = [hf_greedy(tiny_hf, p, GREEDY.max_tokens) for p in prompts]
    llm = make_llm(
        tiny_model_dir,
        max_num_batched_tokens=budget,
        block_size=8,
        cpu_linear=path if path in ("auto", "onednn", "plain") else "native",
    )
    model = llm.engine.runner.model
    if path != "auto":
        assert (model.fused_decode is not None) == (path not in ("onednn", "plain"))
    if path == "per-op":
        model.fused_decode = None
    if path == "x86-64-v3":
        kernels = CpuKernels(build_library(path))
        assert model.kernels is not None and kernels.block_cols == model.kernels.block_cols
        for m in model.modules():
            if isinstance(m, NativeLinear):
                m.kernels = kernels  # the packed layout is the same for every build
        model.use_cpu_kernels(kernels)
    outs = llm.generate(prompts, GREEDY)
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert_matches(out.token_ids, ref, f"prompt {i} (len {len(prompts[i])})")


def _smol_prompts(llm) -> list[list[int]]:
    tok = llm.tokenizer
    long_text = " ".join(
        f"Record {i}: the {['red', 'blue', 'green'][i % 3]} box holds {i * 7 % 13} stones."
        for i in range(90)
    )
    return [
        tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}]),
        tok.encode("The quick brown fox"),
        tok.apply_chat_template([{"role": "user", "content": "Explain gravity to a child."}]),
        tok.encode(long_text + " Which box holds the most stones?"),
    ]


@pytest.mark.slow
def test_smollm2_matches_hf(make_llm, smollm2_dir, smollm2_hf) -> None:
    llm = make_llm(smollm2_dir, max_num_batched_tokens=256)
    prompts = _smol_prompts(llm)
    assert len(prompts[-1]) > 1000
    refs = [hf_greedy(smollm2_hf, p, GREEDY.max_tokens) for p in prompts]
    # one by one
    for i, (p, ref) in enumerate(zip(prompts, refs, strict=True)):
        (out,) = llm.generate([p], GREEDY)
        assert_matches(out.token_ids, ref, f"smollm2 prompt {i}")
    # batched, with the long prompt chunked under the budget
    outs = llm.generate(prompts, GREEDY)
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert_matches(out.token_ids, ref, f"smollm2 batched prompt {i}")


def test_bf16_runs_and_mostly_agrees(make_llm, tiny_model_dir) -> None:
    prompts = _tiny_prompts()[:4]
    fp32 = make_llm(tiny_model_dir).generate(prompts, GREEDY)
    bf16 = make_llm(tiny_model_dir, dtype="bfloat16").generate(prompts, GREEDY)
    assert bf16[0].token_ids  # runs end to end in bf16
    assert make_llm(tiny_model_dir, dtype="bfloat16").engine.kv_cache.tensor.dtype == torch.bfloat16
    # bf16 rounding may flip near-ties later on, but the first token should agree
    assert sum(a.token_ids[0] == b.token_ids[0] for a, b in zip(fp32, bf16, strict=True)) >= 3


@pytest.mark.gpu
def test_cuda_matches_cpu(make_llm, tiny_model_dir, tiny_hf) -> None:
    prompts = _tiny_prompts()
    cuda = make_llm(tiny_model_dir, device="cuda", max_num_batched_tokens=64)
    assert cuda.engine.kv_cache.tensor.is_cuda
    outs = cuda.generate(prompts, GREEDY)
    for i, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        assert_matches(out.token_ids, hf_greedy(tiny_hf, p, GREEDY.max_tokens), f"cuda {i}")
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=5, max_tokens=8)
    assert cuda.generate([prompts[1]], seeded)[0].token_ids == (
        cuda.generate([prompts[1]], seeded)[0].token_ids
    )
