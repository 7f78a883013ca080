"""Model loading: GGUF conversion is exact and cached; the tokenizer streams safely."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch

from engine import SamplingParams
from engine.config import ModelConfig
from engine.model_source import (
    _packaged_gguf,
    converted_dir,
    load_state_dict,
    resolve_model,
)
from engine.tokenizer import IncrementalDetokenizer, Tokenizer


@pytest.mark.slow
def test_gguf_conversion_equals_transformers_gguf_loader(smollm2_dir) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    ref_model = LlamaForCausalLM(LlamaConfig.from_pretrained(str(smollm2_dir)))
    ref = load_gguf_checkpoint(
        str(_packaged_gguf("smollm2-135m-instruct")), return_tensors=True, model_to_load=ref_model
    )["tensors"]
    ours = load_state_dict(smollm2_dir, torch.float32)
    assert set(ours) == set(ref)
    for name, tensor in ours.items():
        assert torch.equal(tensor, ref[name].float()), name


def test_converted_cache_is_reused(smollm2_dir) -> None:
    before = os.stat(smollm2_dir / "model.safetensors").st_mtime_ns
    again = resolve_model("smollm2-135m-instruct")
    assert again == smollm2_dir
    assert os.stat(again / "model.safetensors").st_mtime_ns == before  # not converted again
    cfg = ModelConfig.from_dir(again)
    assert (cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert cfg.tie_word_embeddings and cfg.rope.theta == 100000.0


def test_another_copy_of_the_gguf_reuses_the_conversion(smollm2_dir, tmp_path) -> None:
    """A second clone (another virtualenv, another path, another mtime) finds the same
    cache entry, since the key is the file's content."""
    copy = tmp_path / "elsewhere" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    copy.parent.mkdir()
    shutil.copyfile(_packaged_gguf("smollm2-135m-instruct"), copy)
    before = os.stat(smollm2_dir / "model.safetensors").st_mtime_ns
    assert resolve_model(str(copy)) == smollm2_dir
    assert os.stat(smollm2_dir / "model.safetensors").st_mtime_ns == before


def test_the_cache_key_is_the_content(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDSERVE_CACHE", str(tmp_path / "cache"))
    a, b = tmp_path / "a" / "m.gguf", tmp_path / "b" / "m.gguf"
    for path, mtime in ((a, 1_000_000_000), (b, 2_000_000_000)):
        path.parent.mkdir()
        path.write_bytes(b"GGUF same bytes")
        os.utime(path, ns=(mtime, mtime))
    assert converted_dir(a) == converted_dir(b)
    records = sorted((tmp_path / "cache" / "digests").iterdir())
    digest = hashlib.sha256(b"GGUF same bytes").hexdigest()
    assert len(records) == 2 and {r.read_text() for r in records} == {digest}
    assert converted_dir(a).name == f"m-{digest[:16]}"
    b.write_bytes(b"GGUF other bytes")
    os.utime(b, ns=(3_000_000_000, 3_000_000_000))
    assert converted_dir(b) != converted_dir(a)


def test_unknown_model_is_a_clear_error(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match="neither a known name"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        resolve_model(str(tmp_path))


def test_incremental_detokenizer_never_splits_characters(smollm2_dir) -> None:
    tok = Tokenizer(smollm2_dir)
    text = "héllo 世界 🎉 naïve café — done"
    ids = tok.encode(text)
    detok = IncrementalDetokenizer(tok, [1], stop=[])
    pieces = []
    for i in ids:
        detok.push(i)
        pieces.append(detok.delta(finished=False))
    pieces.append(detok.delta(finished=True))
    for p in pieces:
        p.encode("utf-8")  # a lone surrogate or replacement char would show up here
        assert "\ufffd" not in p
    assert "".join(pieces) == text


def test_stop_strings_cut_and_hold_back(smollm2_dir) -> None:
    tok = Tokenizer(smollm2_dir)
    ids = tok.encode("alpha beta STOP gamma")
    detok = IncrementalDetokenizer(tok, [1], stop=["STOP"])
    streamed = ""
    stopped = False
    for i in ids:
        stopped = detok.push(i)
        streamed += detok.delta(finished=stopped)
        if stopped:
            break
        assert "STO" not in streamed  # a possible stop prefix is never streamed early
    assert stopped and detok.stop_reason == "STOP"
    assert streamed == detok.text == "alpha beta "


def test_engine_stop_string_and_stop_token(make_llm, tiny_model_dir) -> None:
    llm = make_llm(tiny_model_dir)
    base = llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[
        0
    ]
    stop_tok = base.token_ids[3]
    out = llm.generate(
        [[5, 6, 7]],
        SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop_token_ids=[stop_tok]),
    )[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert out.token_ids == base.token_ids[: base.token_ids.index(stop_tok) + 1]
    word = base.text.strip().split()[1] if len(base.text.split()) > 1 else None
    if word:
        cut = llm.generate(
            [[5, 6, 7]], SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=[word])
        )[0]
        assert cut.finish_reason == "stop" and word not in cut.text
        assert base.text.startswith(cut.text)
