"""Fixtures shared by the whole suite: model directories and their HF references, and
the fuzz tests' figures, printed in the run's summary."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

TINY_CONFIG = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=2048,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    tie_word_embeddings=True,
    bos_token_id=1,
    eos_token_id=2,
    initializer_range=0.2,
)


_FUZZ_FIGURES: list[str] = []


@pytest.fixture(scope="session")
def fuzz_figures() -> list[str]:
    """Lines a fuzz test appends (cases, outcomes, wall time) for the run's summary."""
    return _FUZZ_FIGURES


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _FUZZ_FIGURES:
        terminalreporter.section("fuzz")
        for line in _FUZZ_FIGURES:
            terminalreporter.write_line(line)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M-Instruct in HF format (converted from the packaged GGUF once)."""
    from engine.model_source import resolve_model

    return resolve_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, smollm2_dir: Path) -> Path:
    """A random 4-layer Llama (hidden 64, GQA 4:2) with SmolLM2's tokenizer."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**TINY_CONFIG))
    model.save_pretrained(str(out))
    for name in os.listdir(smollm2_dir):
        if name.startswith("tokenizer") or name.endswith(".jinja"):
            shutil.copy(smollm2_dir / name, out / name)
    return out
