"""Fixtures for the cluster tests: greedy references from the single-process engine.

Each test module starts its own cluster (`cluster_harness.ClusterHarness`, module
scoped) with the tiny model, so one Ray + Serve start serves all of its cases.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from engine import LLM


@pytest.fixture(scope="session")
def reference_llm(tiny_model_dir: Path) -> LLM:
    """The single-process engine on the same weights and limits as the cluster."""
    return LLM(str(tiny_model_dir), num_threads=1, kv_cache_bytes=4 << 20, max_model_len=256)
