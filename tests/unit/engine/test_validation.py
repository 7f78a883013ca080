"""Bad input raises ValueError naming the field and leaves other requests alone."""

from __future__ import annotations

import pytest

from engine import EngineConfig, SamplingParams

OK = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


@pytest.mark.parametrize(
    ("prompt", "params", "field"),
    [
        ([1] * 300, OK, "prompt"),  # longer than max_model_len
        ([1, 2], SamplingParams(max_tokens=0), "max_tokens"),
        ([1, 2], SamplingParams(top_p=0.0), "top_p"),
        ([1, 2], SamplingParams(top_p=1.5), "top_p"),
        ([1, 2], SamplingParams(temperature=-0.1), "temperature"),
        ([1, 49152], OK, "prompt_token_ids"),
        ([-1, 2], OK, "prompt_token_ids"),
        ([], OK, "prompt"),
        ([1, 2], SamplingParams(stop=["x"] * 17), "stop"),
        ([1, 2], SamplingParams(stop=[""]), "stop"),
        ([1, 2], SamplingParams(logprobs=21), "logprobs"),
        ([1, 2], SamplingParams(stop_token_ids=[10**6]), "stop_token_ids"),
        ([1, 2], SamplingParams(top_k=-5), "top_k"),
    ],
)
def test_bad_field_is_named_and_batch_unaffected(
    make_llm, tiny_model_dir, prompt, params, field
) -> None:
    llm = make_llm(tiny_model_dir, max_model_len=256)
    with pytest.raises(ValueError, match=field):
        llm.generate([[5, 6, 7], prompt], [OK, params])
    assert not llm.engine.has_unfinished_requests()  # nothing of the batch was queued
    # the engine keeps serving
    assert len(llm.generate([[5, 6, 7]], OK)[0].token_ids) == 4


def test_bad_request_among_running_ones(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir, max_model_len=256)
    eng = llm.engine
    eng.add_request("good", [5, 6, 7], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True))
    eng.step()
    with pytest.raises(ValueError, match="max_tokens"):
        eng.add_request("bad", [5, 6], SamplingParams(max_tokens=-1))
    with pytest.raises(ValueError, match="request_id"):
        eng.add_request("good", [5, 6], OK)
    done = []
    while eng.has_unfinished_requests():
        done += [o for o in eng.step() if o.finished]
    assert [o.request_id for o in done] == ["good"] and len(done[0].token_ids) == 6


def test_bad_prompt_type_and_chat(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    with pytest.raises(ValueError, match=r"prompts\[0\]"):
        llm.generate([3.5], OK)  # type: ignore[list-item]
    with pytest.raises(ValueError, match="messages must not be empty"):
        llm.chat([[]], OK)
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        llm.chat([[{"role": "wizard", "content": "hi"}]], OK)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"block_size": 0}, "block_size"),
        ({"dtype": "int3"}, "dtype"),
        ({"max_num_batched_tokens": 0}, "max_num_batched_tokens"),
        ({"device": "tpu"}, "device"),
        ({"num_threads": 0}, "num_threads"),
    ],
)
def test_engine_config_is_validated_when_built(kwargs, field) -> None:
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_kv_budget_too_small_for_max_model_len(tiny_model_dir) -> None:
    from engine import LLM

    with pytest.raises(ValueError, match="kv_cache_bytes"):
        LLM(str(tiny_model_dir), kv_cache_bytes=64 * 1024, max_model_len=2048)
