"""TP/PP engines give the same greedy tokens as TP=1 and as HF, over real Gloo groups.

Rank 0 runs in the test process; the other ranks are spawned processes, each with
one torch thread.
"""

from __future__ import annotations

import random
import time

import pytest
import torch
from hf_reference import assert_matches, hf_greedy
from leak_checks import assert_engine_empty

from engine import LLM, SamplingParams
from engine.config import ModelConfig
from engine.parallel.layout import ParallelLayout

GREEDY = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)


def _prompts() -> list[list[int]]:
    rng = random.Random(11)
    return [[rng.randrange(3, 49152) for _ in range(n)] for n in (1, 6, 40, 150)]


@pytest.mark.parametrize(("tp", "pp"), [(2, 1), (1, 2), (2, 2)])
def test_tiny_tp_pp_match_hf(tiny_model_dir, tiny_hf, tp, pp) -> None:
    prompts = _prompts()
    refs = [hf_greedy(tiny_hf, p, GREEDY.max_tokens) for p in prompts]
    with LLM(
        str(tiny_model_dir), tp=tp, pp=pp, num_threads=1, max_num_batched_tokens=32
    ) as llm:  # chunked prefill across ranks
        outs = llm.generate(prompts, GREEDY)
        assert_engine_empty(llm)
        assert llm.engine.kv_cache.layout.num_layers == 4 // pp
        assert llm.engine.kv_cache.layout.num_kv_heads == 2 // tp
        # PP decodes two micro-batches at a time once only decodes are left
        assert (llm.engine.runner.num_pipelined_steps > 0) == (pp > 1)
    for i, (out, ref) in enumerate(zip(outs, refs, strict=True)):
        assert_matches(out.token_ids, ref, f"tp={tp} pp={pp} prompt {i}")


@pytest.mark.slow
def test_smollm2_tp3_matches_hf(smollm2_dir, smollm2_hf) -> None:
    with LLM(str(smollm2_dir), tp=3, num_threads=1) as llm:
        tok = llm.tokenizer
        prompts = [
            tok.apply_chat_template(
                [{"role": "user", "content": "What is the capital of France?"}]
            ),
            tok.encode("The quick brown fox"),
        ]
        outs = llm.generate(prompts, GREEDY)
        assert llm.engine.kv_cache.layout.num_kv_heads == 1  # 3 KV heads over 3 ranks
        assert_engine_empty(llm)
    for i, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        assert_matches(out.token_ids, hf_greedy(smollm2_hf, p, GREEDY.max_tokens), f"p{i}")


def _cfg(heads: int, kv_heads: int, layers: int = 4) -> ModelConfig:
    return ModelConfig(
        vocab_size=96,
        hidden_size=heads * 8,
        intermediate_size=48,
        num_layers=layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=8,
    )


@pytest.mark.parametrize(
    ("tp", "pp", "cfg", "reason"),
    [
        (2, 1, _cfg(9, 3), "must divide the 9 attention heads"),
        (4, 1, _cfg(12, 6), "neither divides the other"),
        (1, 5, _cfg(4, 2, layers=4), "greater than the 4 layers"),
        (1, 3, _cfg(4, 2, layers=4), "must divide the 4 layers"),
    ],
)
def test_bad_layouts_are_rejected_with_the_reason(tp, pp, cfg, reason) -> None:
    with pytest.raises(ValueError, match=reason):
        ParallelLayout(tp, pp).check(cfg)


def test_replicated_kv_heads_when_fewer_than_ranks() -> None:
    cfg = _cfg(8, 2)
    heads = [ParallelLayout(4, 1, r).kv_heads(cfg) for r in range(4)]
    assert heads == [range(0, 1), range(0, 1), range(1, 2), range(1, 2)]
    # each rank's query heads use exactly the KV head it holds
    for r in range(4):
        lay = ParallelLayout(4, 1, r)
        group = cfg.num_heads // cfg.num_kv_heads
        assert {q // group for q in lay.q_heads(cfg)} == set(lay.kv_heads(cfg))


@pytest.mark.parametrize(("tp", "pp"), [(1, 1), (2, 1), (4, 1), (2, 2), (1, 4)])
def test_sharding_agrees_with_kv_transfer_mapping(tp, pp) -> None:
    from kv_transfer.base import Parallelism
    from kv_transfer.mapping import KVGeometry

    cfg = _cfg(8, 2, layers=8)
    geo, par = KVGeometry(cfg.num_layers, cfg.num_kv_heads), Parallelism(tp, pp)
    for rank in range(tp * pp):
        lay = ParallelLayout(tp, pp, rank)
        assert lay.layers(cfg) == geo.rank_layers(par, rank)
        assert lay.kv_heads(cfg) == geo.rank_heads(par, rank)


@pytest.mark.gpu
def test_tiny_tp2_nccl_matches_hf(tiny_model_dir, tiny_hf) -> None:
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    prompts = _prompts()
    with LLM(str(tiny_model_dir), tp=2, device="cuda") as llm:
        outs = llm.generate(prompts, GREEDY)
    for i, (p, out) in enumerate(zip(prompts, outs, strict=True)):
        assert_matches(out.token_ids, hf_greedy(tiny_hf, p, GREEDY.max_tokens), f"p{i}")


def test_step_inputs_carry_each_prompt_chunk_for_the_other_ranks() -> None:
    """The other ranks read back, from the broadcast step alone, which request each
    prompt chunk belongs to (by tag), its blocks, its positions and whether it ends
    the prompt: what their KV-transfer hooks need."""
    from engine.step_inputs import StepInputs, request_tag

    step = StepInputs.pack(
        input_ids=[5, 6, 7, 8, 9],
        positions=[3, 16, 17, 18, 19],
        slots=[35, 48, 49, 50, 51],
        decode_tables=[[2, 3]],
        decode_lens=[4],
        prefills=[(1, 4, 16, [7, 8], request_tag("req-a"), True)],
        sample_rows=[0, 4],
    )
    wire = StepInputs(step.header.clone(), step.payload.clone())
    (chunk,) = wire.prefill_chunks()
    assert chunk.tag == request_tag("req-a") != request_tag("req-b")
    assert (chunk.block_ids, chunk.start, chunk.end, chunk.completes_prompt) == (
        (7, 8),
        16,
        20,
        True,
    )
    ids, pos, meta, rows = wire.unpack(torch.device("cpu"), block_size=16)
    assert ids.tolist() == [5, 6, 7, 8, 9] and rows.tolist() == [0, 4]
    assert pos.tolist() == [3, 16, 17, 18, 19]
    (span,) = meta.prefills
    assert (span.start, span.length, span.context_len) == (1, 4, 16)
    assert span.block_table.tolist() == [7, 8]
    assert 0 <= request_tag("x" * 300) < 2**63


def test_an_idle_tp_pp_engine_outlives_the_group_timeout(tiny_model_dir) -> None:
    """The other ranks wait for steps with the groups' timeout; an idle rank 0 keeps
    them alive with IDLE steps, so the engine still serves after idling for several
    timeouts (and identically)."""
    from engine import EngineConfig, LLMEngine
    from engine.parallel.launch import LocalRanks

    config = EngineConfig(model=str(tiny_model_dir), tp=2, pp=2, num_threads=1)
    # 4 s: a first step of four processes on two busy cores can take a second or two.
    ranks = LocalRanks(config, timeout_s=4.0, setup_timeout_s=120.0)
    try:
        engine = LLMEngine(config, groups=ranks.groups)
        keepalive = engine.runner.keepalive
        assert keepalive is not None and keepalive.interval_s == 1.0

        def generate(rid: str) -> list[int]:
            engine.add_request(rid, [5, 6, 7, 8, 9], GREEDY)
            tokens: list[int] = []
            while engine.has_unfinished_requests():
                for out in engine.step():
                    tokens = out.token_ids
            return tokens

        first = generate("before")
        sent = keepalive.num_sent
        time.sleep(10.0)  # 2.5 group timeouts with no step
        assert keepalive.num_sent >= sent + 5
        assert generate("after") == first
        assert all(p.is_alive() for p in ranks.procs)
        engine.shutdown()
    finally:
        ranks.close()
    assert not any(p.is_alive() for p in ranks.procs)


def test_a_dead_rank_of_an_idle_engine_fails_its_health_check(tiny_model_dir) -> None:
    """The keepalive finds a killed rank while the engine idles, and `check()` (what a
    replica's health check calls) raises instead of waiting for the next request."""
    from engine import EngineConfig, LLMEngine
    from engine.parallel.launch import LocalRanks

    config = EngineConfig(model=str(tiny_model_dir), tp=2, num_threads=1)
    ranks = LocalRanks(config, timeout_s=2.0, setup_timeout_s=120.0)
    try:
        engine = LLMEngine(config, groups=ranks.groups)
        engine.check()
        ranks.procs[0].kill()
        ranks.procs[0].join(10)
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline:
            try:
                engine.check()
            except RuntimeError as e:
                assert "unreachable" in str(e)
                break
            time.sleep(0.1)
        else:
            pytest.fail("a dead rank went unnoticed for 10 s (5 group timeouts)")
        engine.shutdown()
    finally:
        ranks.close()
