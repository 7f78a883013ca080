"""The real model through the disaggregated cluster, with the KV cache in shared memory
(the shm transport): greedy chat output matches the single-process engine token for
token on the remote-prefill path, on the decode-local one, and after a corrupted
transfer that the decode replica recomputes (counted in the metrics)."""

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
QUESTION2 = "Name the largest planet of the solar system, in a few words."


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
            # The prefill replica corrupts its very first KV slice: the first remote
            # prefill fails its checksum on the decode replica and is recomputed there.
            "kv_transfer.faults=[{kind: corrupt, after: 0, times: 1}]",
        ],
    )
    harness = ClusterHarness(config, str(smollm2_dir)).start()
    yield harness
    harness.stop()


def test_smollm2_chat_matches_single_engine(cluster: ClusterHarness, smollm2_dir: Path) -> None:
    llm = LLM(str(smollm2_dir), num_threads=1, kv_cache_bytes=64 << 20, max_model_len=512)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    want = llm.chat([[{"role": "user", "content": QUESTION}]], params)[0]
    want2 = llm.chat([[{"role": "user", "content": QUESTION2}]], params)[0]
    want_short = llm.generate(["Paris is"], params)[0]
    sampling = Sampling(temperature=0, max_tokens=MAX_TOKENS)
    with cluster.client() as c:
        recomputed = c.chat([("user", QUESTION)], sampling)
        chat = c.chat([("user", QUESTION2)], sampling)
        short = c.generate("Paris is", sampling)
    # The corrupted transfer: recomputed on decode, same tokens.
    assert not recomputed.timings.disaggregated
    assert list(recomputed.token_ids) == want.token_ids and recomputed.text == want.text
    # The next long prompt goes the remote-prefill way.
    assert chat.timings.disaggregated  # the chat template makes it long
    assert list(chat.token_ids) == want2.token_ids
    assert chat.text == want2.text
    assert not short.timings.disaggregated
    assert list(short.token_ids) == want_short.token_ids
    metrics = cluster.http("GET", "/metrics").body.decode()
    assert 'pdserve_remote_prefill_fallbacks_total{reason="transfer"} 1.0' in metrics
    assert "pdserve_kv_transfer_failures_total 1.0" in metrics
    decode = next(s for s in cluster.worker_states() if s.pool == "decode")
    assert (decode.remote_prefill_fallbacks, decode.transfer_failures) == (1, 1)
