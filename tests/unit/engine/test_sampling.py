"""Sampling: seeds reproduce, top_k=1 is greedy, and the distribution is sane."""

from __future__ import annotations

import math

import pytest
import torch

from engine import SamplingParams
from engine.sampling import Sampler, SamplingError, greedy_tokens, skip_draws

PROMPTS = [[5, 6, 7, 8, 9], [100, 200, 300], [42] * 20]


def test_seed_reproduces_even_in_a_different_batch(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    p = SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], p)[0].token_ids
    other = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    mixed = llm.generate([PROMPTS[1], PROMPTS[0], PROMPTS[2]], [other, p, other])[1].token_ids
    assert alone == mixed
    different = llm.generate(
        [PROMPTS[0]],
        SamplingParams(temperature=1.0, top_p=0.9, max_tokens=20, seed=99, ignore_eos=True),
    )[0].token_ids
    assert different != alone


def test_top_k_one_equals_greedy(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    greedy = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=15, ignore_eos=True))
    topk1 = llm.generate(
        PROMPTS, SamplingParams(temperature=0.8, top_k=1, max_tokens=15, ignore_eos=True, seed=3)
    )
    assert [o.token_ids for o in greedy] == [o.token_ids for o in topk1]


def test_logprobs_are_consistent(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    out = llm.generate(
        [PROMPTS[0]], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True)
    )[0]
    assert out.logprobs is not None and len(out.logprobs) == 5
    for tok, lp in zip(out.token_ids, out.logprobs, strict=True):
        assert lp.token_id == tok and len(lp.top) == 3
        assert lp.top[0][0] == tok and math.isclose(lp.top[0][1], lp.logprob)
        assert lp.top[0][1] >= lp.top[1][1] >= lp.top[2][1] and lp.logprob <= 0


def _draws(logits: torch.Tensor, params: SamplingParams, n: int) -> torch.Tensor:
    s = Sampler(seed=0)
    gen = torch.Generator().manual_seed(0)
    toks = [s.sample(logits[None], [params], [gen])[0][0] for _ in range(n)]
    return torch.bincount(torch.tensor(toks), minlength=logits.numel()).float()


def test_greedy_tokens_follow_torch_argmax_on_ties_infinities_and_nans() -> None:
    nan, inf = float("nan"), float("inf")
    rows = torch.tensor(
        [
            [0.5, 2.0, 2.0, -1.0],  # a tie: the first
            [-inf, -inf, -inf, -inf],  # all -inf: the first
            [1.0, nan, 3.0, nan],  # a NaN counts as the largest: the first NaN
            [inf, 1.0, inf, 0.0],
            [-0.0, 0.0, -1.0, -2.0],  # -0 == 0: the first
        ]
    )
    wide = torch.randn(8, 49152)
    wide[3, 100] = wide[3, 40000] = wide[3].max() + 1
    for logits in (rows, wide, wide[:, ::2], wide.t().contiguous().t()):
        got = greedy_tokens(logits)
        assert got.dtype == torch.int64
        assert got.tolist() == logits.argmax(dim=-1).tolist()


def test_distribution_matches_softmax() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    n = 4000
    counts = _draws(logits, SamplingParams(temperature=1.0), n)
    expected = torch.softmax(logits, -1) * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # p ~ 0.0004 for 4 degrees of freedom


def test_top_k_and_top_p_restrict_support() -> None:
    logits = torch.tensor([3.0, 2.0, 1.0, 0.0, -1.0])
    topk = _draws(logits, SamplingParams(temperature=1.0, top_k=2), 500)
    assert topk[2:].sum() == 0 and topk[:2].min() > 0
    probs = torch.softmax(logits, -1)  # [0.64, 0.23, 0.09, ...]
    assert probs[0] < 0.8 < probs[:2].sum()
    topp = _draws(logits, SamplingParams(temperature=1.0, top_p=0.8), 500)
    assert topp[2:].sum() == 0 and topp[1] > 0
    cold = _draws(logits, SamplingParams(temperature=0.05), 200)
    assert cold[0] == 200


@pytest.mark.parametrize("top_p", [5e-324, 1e-46, 1e-30])
def test_a_top_p_near_zero_keeps_the_most_likely_token(top_p: float) -> None:
    """Valid (in (0, 1]) yet 0 once compared in fp32: the draw is the top token, never
    an all-masked row (which would fail the engine's whole step)."""
    logits = torch.tensor([1.0, 3.0, 2.0, 0.0])
    draws = _draws(logits, SamplingParams(temperature=1.0, top_p=top_p), 50)
    assert draws[1] == 50


def test_skip_draws_continues_another_generators_stream() -> None:
    """(seed, draws) is enough to continue a seeded request's random stream elsewhere,
    whatever the distributions the first draws came from."""
    vocab = 50
    params = [SamplingParams(temperature=0.8, top_p=0.9, top_k=20, seed=5)]
    logits = [torch.randn(1, vocab, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    sampler = Sampler()
    here = torch.Generator().manual_seed(5)
    first = [sampler.sample(logits[i], params, [here])[0][0] for i in range(2)]
    rest = [sampler.sample(logits[i], params, [here])[0][0] for i in range(2, 4)]
    there = torch.Generator().manual_seed(5)
    skip_draws(there, vocab, len(first))
    assert [sampler.sample(logits[i], params, [there])[0][0] for i in range(2, 4)] == rest
    with pytest.raises(ValueError, match="draws"):
        skip_draws(there, vocab, -1)


def test_penalties_lower_generated_tokens_by_presence_and_count() -> None:
    logits = torch.tensor([[3.0, 2.9, 2.0, 1.0, 0.0]])
    outputs = [[0, 0, 1]]  # token 0 twice, token 1 once
    s = Sampler()
    p = SamplingParams(temperature=0, presence_penalty=0.5, frequency_penalty=0.25, logprobs=1)
    # 3.0 - 0.5 - 2 * 0.25 = 2.0, 2.9 - 0.5 - 0.25 = 2.15, token 2 stays 2.0: token 1 wins
    (tok,), (lp,) = s.sample(logits, [p], [None], outputs)
    assert tok == 1
    assert lp is not None and math.isclose(lp.logprob, float(torch.log_softmax(logits[0], -1)[1]))
    assert lp.top[0][0] == 0  # logprobs are of the raw distribution
    # Without generated tokens, or without penalties, nothing changes.
    assert s.sample(logits, [p], [None], [[]])[0] == [0]
    assert s.sample(logits, [SamplingParams(temperature=0)], [None], outputs)[0] == [0]
    negative = SamplingParams(temperature=0, presence_penalty=-2.0)
    assert s.sample(torch.tensor([[1.0, 2.0]]), [negative], [None], [[0]])[0] == [0]


def test_penalized_sampling_draws_from_the_penalized_distribution() -> None:
    """With one generator, sampling under penalties equals sampling the logits lowered
    by hand: the penalty is exactly OpenAI's formula, applied before temperature."""
    torch.manual_seed(0)
    logits = torch.randn(2, 50)
    outputs = [[3, 3, 7, 9, 3], [1]]
    pen = [
        SamplingParams(temperature=0.7, top_p=0.9, presence_penalty=1.5, frequency_penalty=-0.5),
        SamplingParams(temperature=1.0, frequency_penalty=2.0),
    ]
    by_hand = logits.clone()
    by_hand[0, 3] -= 1.5 - 0.5 * 3
    by_hand[0, 7] -= 1.5 - 0.5
    by_hand[0, 9] -= 1.5 - 0.5
    by_hand[1, 1] -= 2.0
    plain = [
        SamplingParams(temperature=0.7, top_p=0.9),
        SamplingParams(temperature=1.0),
    ]
    for seed in range(20):
        gens_a = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        gens_b = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed + 1)]
        a = Sampler().sample(logits, pen, list(gens_a), outputs)[0]
        b = Sampler().sample(by_hand, plain, list(gens_b))[0]
        assert a == b


def test_penalty_bounds_are_named() -> None:
    for name in ("presence_penalty", "frequency_penalty"):
        for bad in (2.5, -2.01, float("nan")):
            with pytest.raises(SamplingError, match=rf"^{name}: must be in \[-2, 2\]"):
                SamplingParams(**{name: bad}).validate(100)


def test_engine_greedy_with_penalties_matches_hf_with_the_same_penalties(
    make_llm, tiny_model_dir, tiny_hf
) -> None:
    """The engine passes each sequence's generated tokens to the sampler: greedy output
    under penalties is HF's greedy output with the penalties applied by hand."""
    from hf_reference import Reference, assert_matches

    prompt, n = [42] * 20, 24  # the random model repeats itself after this prompt
    params = SamplingParams(
        temperature=0, max_tokens=n, ignore_eos=True, presence_penalty=1.0, frequency_penalty=0.5
    )
    ours = make_llm(tiny_model_dir).generate([prompt], params)[0].token_ids
    tokens: list[int] = []
    gaps: list[float] = []
    with torch.inference_mode():
        out = tiny_hf(torch.tensor([prompt]), use_cache=True)
        for _ in range(n):
            x = out.logits[0, -1].float().clone()
            for t in set(tokens):
                x[t] -= 1.0 + 0.5 * tokens.count(t)
            top = torch.log_softmax(x, -1).topk(2)
            tokens.append(int(top.indices[0]))
            gaps.append(float(top.values[0] - top.values[1]))
            out = tiny_hf(
                torch.tensor([[tokens[-1]]]), past_key_values=out.past_key_values, use_cache=True
            )
    assert_matches(list(ours), Reference(tokens, gaps), "penalized greedy")
    plain = make_llm(tiny_model_dir).generate(
        [prompt], SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)
    )[0]
    assert len(set(plain.token_ids)) < n  # unpenalized, it repeats tokens
    assert list(plain.token_ids) != tokens  # and the penalties changed that
