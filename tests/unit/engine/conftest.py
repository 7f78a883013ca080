"""Engine fixtures: a factory that builds engines and checks them for leaks."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from leak_checks import assert_engine_empty

from engine import LLM


@pytest.fixture
def make_llm() -> Iterator[Callable[..., LLM]]:
    built: list[LLM] = []

    def make(model_dir: Path, **kw: Any) -> LLM:
        kw.setdefault("num_threads", 2)
        llm = LLM(str(model_dir), **kw)
        built.append(llm)
        return llm

    yield make
    for llm in built:
        assert_engine_empty(llm)


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_dir: Path) -> torch.nn.Module:
    from hf_reference import load_hf

    return load_hf(tiny_model_dir)


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_dir: Path) -> torch.nn.Module:
    from hf_reference import load_hf

    return load_hf(smollm2_dir)
