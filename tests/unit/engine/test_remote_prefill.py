"""The decode side of disaggregation inside the engine: reserve, commit, fail, abort.

A prefill engine computes the prompt; a hook copies its KV blocks straight into the
blocks a decode engine reserved (what kv_transfer does across processes). The decode
engine then continues, and its output equals one engine's, seeded sampling included.
"""

from __future__ import annotations

from collections.abc import Sequence

import pytest
from leak_checks import assert_engine_empty

from engine import LLM, SamplingParams
from engine.block_pool import OutOfBlocksError
from engine.forward_hooks import ScheduledChunk

PROMPT = list(range(300, 341))  # 41 tokens: 2 full blocks of 16 and a partial one


class CopyInto:
    """Copies each finished prompt's blocks into the decode engine's reserved blocks."""

    def __init__(self) -> None:
        self.dst: LLM | None = None
        self.src: LLM | None = None
        self.dst_blocks: list[int] = []

    def on_layer_done(self, layer: int, chunks: Sequence[ScheduledChunk]) -> None:
        pass

    def on_step_done(self, chunks: Sequence[ScheduledChunk]) -> None:
        assert self.src is not None and self.dst is not None
        for c in chunks:
            if c.completes_prompt:
                n = len(self.dst_blocks)
                src = self.src.engine.kv_cache.tensor[:, :, list(c.block_ids[:n])]
                self.dst.engine.kv_cache.tensor[:, :, self.dst_blocks] = src


def _prefill_then_decode(tiny_model_dir, make_llm, params: SamplingParams):
    hook = CopyInto()
    prefill = make_llm(tiny_model_dir)
    prefill.engine.runner.hook = hook
    decode = make_llm(tiny_model_dir)
    hook.src, hook.dst = prefill, decode
    hook.dst_blocks = decode.engine.reserve_remote_prefill("r", PROMPT, params)
    first_params = SamplingParams(**{**params.__dict__, "max_tokens": 1})
    (first,) = prefill.generate([PROMPT], first_params)
    out = decode.engine.commit_remote_prefill(
        "r", first.token_ids[0], first.logprobs[0] if first.logprobs else None, first.sampler_draws
    )
    tokens = list(out.token_ids)
    logprobs = list(out.logprobs or [])
    while decode.engine.has_unfinished_requests():
        for o in decode.engine.step():
            tokens, logprobs = list(o.token_ids), list(o.logprobs or [])
    return tokens, logprobs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=1.0, top_p=0.9, seed=77, max_tokens=12, ignore_eos=True),
    ],
    ids=["greedy", "seeded"],
)
def test_remote_prefill_continues_like_one_engine(make_llm, tiny_model_dir, params) -> None:
    (single,) = make_llm(tiny_model_dir).generate([PROMPT], params)
    tokens, logprobs = _prefill_then_decode(tiny_model_dir, make_llm, params)
    assert tokens == single.token_ids
    if params.logprobs is not None:
        assert [lp.token_id for lp in logprobs] == single.token_ids  # first one included


def test_failed_transfer_recomputes_locally(make_llm, tiny_model_dir) -> None:
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    (single,) = make_llm(tiny_model_dir).generate([PROMPT], params)
    decode = make_llm(tiny_model_dir)
    eng = decode.engine
    eng.reserve_remote_prefill("r", PROMPT, params)
    assert eng.block_pool.num_free == eng.block_pool.num_blocks - 3
    assert eng.load().queued_prefill_tokens == 0  # reserved, not queued here
    eng.fail_remote_prefill("r")
    assert eng.num_remote_prefill_fallbacks == 1 and eng.load().queued_prefill_tokens == 41
    final = None
    while eng.has_unfinished_requests():
        final = next((o for o in eng.step() if o.finished), final)
    assert final is not None and final.token_ids == single.token_ids


def test_abort_and_out_of_blocks_while_reserved(make_llm, tiny_model_dir) -> None:
    decode = make_llm(tiny_model_dir, kv_cache_bytes=8 * 16 * 1024, max_model_len=128)
    eng = decode.engine
    params = SamplingParams(max_tokens=4)
    eng.reserve_remote_prefill("a", PROMPT, params)
    with pytest.raises(OutOfBlocksError):
        eng.reserve_remote_prefill("b", PROMPT * 3, params)  # 8 blocks, 5 free
    with pytest.raises(ValueError, match="request_id"):
        eng.reserve_remote_prefill("a", PROMPT, params)
    eng.abort_request("a")
    with pytest.raises(KeyError):
        eng.commit_remote_prefill("a", 5)
    assert_engine_empty(decode)


def test_local_prompt_waits_for_blocks_held_by_a_reservation(make_llm, tiny_model_dir) -> None:
    """A local prompt that cannot fit next to a reservation, with nothing running,
    waits for it (the step is idle) instead of failing the engine."""
    decode = make_llm(tiny_model_dir, kv_cache_bytes=8 * 16 * 1024, max_model_len=128)
    eng = decode.engine
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    eng.reserve_remote_prefill("a", PROMPT, params)  # 3 of 8 blocks
    eng.add_request("b", PROMPT * 2, params)  # 82 + 4 tokens: 6 blocks, 5 free
    assert eng.step() == [] and eng.step() == []
    eng.fail_remote_prefill("a")  # its blocks come back; both prompts run locally
    for _ in range(50):
        eng.step()
        if not eng.has_unfinished_requests():
            break
    assert_engine_empty(decode)
