"""The real model through the disaggregated cluster, with the KV cache in shared memory
(the shm transport): greedy chat output matches the single-process engine token for
token, on the remote-prefill path and on the decode-local one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster_harness import ClusterHarness, free_port

from cluster.client import Sampling
from cluster.config_file import load_config
from engine import LLM, SamplingParams

pytestmark = pytest.mark.slow

MAX_TOKENS = 8
QUESTION = "What is the capital of France? Answer in one short sentence."


@pytest.fixture(scope="module")
def cluster(smollm2_dir: Path) -> Iterator[ClusterHarness]:
    config = load_config(
        None,
        [
            "name=smol",
            f"model.source={smollm2_dir}",
            "model.max_model_len=512",
            f"server.http_port={free_port()}",
            f"server.grpc_port={free_port()}",
            "pools.prefill.engine.kv_cache_bytes=64MiB",
            "pools.decode.engine.kv_cache_bytes=64MiB",
            "kv_transfer.transport=shm",
            "router.disaggregation_threshold=24",
        ],
    )
    harness = ClusterHarness(config, str(smollm2_dir)).start()
    yield harness
    harness.stop()


def test_smollm2_chat_matches_single_engine(cluster: ClusterHarness, smollm2_dir: Path) -> None:
    llm = LLM(str(smollm2_dir), num_threads=1, kv_cache_bytes=64 << 20, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    want = llm.chat([[{"role": "user", "content": QUESTION}]], params)[0]
    want_short = llm.generate(["Paris is"], params)[0]
    sampling = Sampling(temperature=0, max_tokens=MAX_TOKENS)
    with cluster.client() as c:
        chat = c.chat([("user", QUESTION)], sampling)
        short = c.generate("Paris is", sampling)
    assert chat.timings.disaggregated  # the chat template makes it long
    assert list(chat.token_ids) == want.token_ids
    assert chat.text == want.text
    assert not short.timings.disaggregated
    assert list(short.token_ids) == want_short.token_ids
