"""Resuming a request another instance started (engine.resume): an engine given the
first k generated tokens and the text already sent continues exactly where the
undisturbed run was, in tokens and in text, seeded sampling, penalties and stop
strings included; locally and through a remote prefill of prompt + resumed tokens."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from engine import LLM, LLMEngine, Resume, SamplingParams
from engine.forward_hooks import ScheduledChunk

PROMPT = list(range(300, 341))


class CopyInto:
    """Copies a prompt's blocks, once computed, into the blocks a decode engine holds
    for it (what kv_transfer does between instances)."""

    def __init__(self, src: LLM, dst: LLM) -> None:
        self.src, self.dst = src, dst
        self.dst_blocks: list[int] = []

    def on_layer_done(self, layer: int, chunks: Sequence[ScheduledChunk]) -> None:
        pass

    def on_step_done(self, chunks: Sequence[ScheduledChunk]) -> None:
        for c in chunks:
            if c.completes_prompt:
                n = len(self.dst_blocks)
                src = self.src.engine.kv_cache.tensor[:, :, list(c.block_ids[:n])]
                self.dst.engine.kv_cache.tensor[:, :, self.dst_blocks] = src


def _run(engine: LLMEngine, rid: str) -> list[tuple[list[int], str]]:
    """(new tokens, new text) of each output of `rid` until it finishes."""
    steps: list[tuple[list[int], str]] = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.request_id == rid:
                steps.append((list(out.new_token_ids), out.new_text))
    return steps


def _sent(steps: list[tuple[list[int], str]], k: int) -> tuple[list[int], str]:
    """The tokens and text a client had after the outputs that carried k tokens."""
    tokens: list[int] = []
    text = ""
    for new, piece in steps:
        if len(tokens) >= k:
            break
        tokens += new
        text += piece
    assert len(tokens) == k
    return tokens, text


def _check_resumes(llm: LLM, prompt: list[int], params: SamplingParams, ks: tuple[int, ...]):
    eng = llm.engine
    eng.add_request("whole", prompt, params)
    whole = _run(eng, "whole")
    tokens = [t for new, _ in whole for t in new]
    text = "".join(piece for _, piece in whole)
    for k in ks:
        done, sent = _sent(whole, k)
        eng.add_request(f"r{k}", prompt, params, Resume(tuple(done), len(sent)))
        rest = _run(eng, f"r{k}")
        assert done + [t for new, _ in rest for t in new] == tokens, f"k={k}"
        assert sent + "".join(piece for _, piece in rest) == text, f"k={k}"
    return tokens, text


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=14, ignore_eos=True),
        SamplingParams(
            temperature=0.9, top_k=50, seed=5, max_tokens=14, ignore_eos=True,
            presence_penalty=0.5, frequency_penalty=0.3,
        ),
    ],
    ids=["greedy", "seeded-penalized"],
)  # fmt: skip
def test_resume_continues_the_undisturbed_run(make_llm, tiny_model_dir, params) -> None:
    llm = make_llm(tiny_model_dir)
    tokens, _ = _check_resumes(llm, PROMPT, params, (1, 6, 13))
    assert len(tokens) == params.max_tokens  # the resumed tokens count in max_tokens


def test_resume_keeps_the_text_and_stop_strings_across_the_seam(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    (ref,) = llm.generate([PROMPT], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True))
    stop = ref.text[len(ref.text) // 2 :][:4]  # a stop string in the second half
    assert len(stop) == 4
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    _, text = _check_resumes(llm, PROMPT, params, (1, 4, 9, 13))
    assert stop not in text and text == ref.text[: ref.text.index(stop)]


def test_a_remote_prefill_resumes_with_the_sampler_state(make_llm, tiny_model_dir: Path) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=77, max_tokens=12, ignore_eos=True)
    (single,) = make_llm(tiny_model_dir).generate([PROMPT], params)
    done = tuple(single.token_ids[:5])
    resume = Resume(done, 0)
    prefill, decode = make_llm(tiny_model_dir), make_llm(tiny_model_dir)
    hook = prefill.engine.runner.hook = CopyInto(prefill, decode)
    hook.dst_blocks = decode.engine.reserve_remote_prefill("r", PROMPT, params, resume=resume)
    assert len(hook.dst_blocks) == -(-(len(PROMPT) + len(done)) // 16)  # prompt + resumed
    # a prefill instance samples one token past the resumed ones
    one = SamplingParams(**{**params.__dict__, "max_tokens": len(done) + 1})
    prefill.engine.add_request("r", PROMPT, one, resume)
    (first,) = [o for o in _steps(prefill.engine) if o.finished]
    assert first.token_ids[:5] == list(done) and first.sampler_draws == 6
    out = decode.engine.commit_remote_prefill("r", first.token_ids[-1], None, first.sampler_draws)
    tokens = list(out.token_ids)
    while decode.engine.has_unfinished_requests():
        for o in decode.engine.step():
            tokens = list(o.token_ids)
    assert tokens == single.token_ids


def _steps(engine: LLMEngine) -> list:
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def test_a_bad_resume_is_refused_naming_the_field(make_llm, tiny_model_dir) -> None:
    eng = make_llm(tiny_model_dir).engine
    params = SamplingParams(temperature=0, max_tokens=3)
    with pytest.raises(ValueError, match=r"resume\.output_token_ids"):
        eng.add_request("a", PROMPT, params, Resume((1, 2, 3), 0))  # nothing left to make
    with pytest.raises(ValueError, match=r"resume\.output_token_ids"):
        eng.add_request("b", PROMPT, params, Resume((), 0))
    with pytest.raises(ValueError, match=r"resume\.text_chars_sent"):
        eng.add_request("c", PROMPT, params, Resume((1,), 10_000))
    assert not eng.has_unfinished_requests()
