"""Fixtures for the fault tests: the single-process engine as the greedy reference.

Each test module starts its own cluster (`cluster_harness.ClusterHarness`, module
scoped) with the tiny model, kills parts of it under streamed load, and checks that
every client still gets its full text or a proper error, never a cut or a stall.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.fault_load import MAX_MODEL_LEN
from engine import LLM


@pytest.fixture(scope="session")
def reference_llm(tiny_model_dir: Path) -> LLM:
    """The single-process engine on the same weights and limits as the cluster."""
    return LLM(
        str(tiny_model_dir), num_threads=1, kv_cache_bytes=16 << 20, max_model_len=MAX_MODEL_LEN
    )
