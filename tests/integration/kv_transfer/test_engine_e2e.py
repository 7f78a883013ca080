"""End to end: a real prefill forward pass streams its KV to a decode engine, which then
generates the same greedy tokens as a single engine does on its own.

The prefill engine runs in a spawned process with a SendHook on its forward pass and
prefills in chunks; the decode engine runs here, with its cache in shared memory for
the shm transport. One request's prefill never happens: its transfer times out, and
the decode engine falls back to computing the prompt itself.
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from kvt_workers import EngineSetup, Spawn, kv_keys, own_segments, prefill_engine_main

from engine import LLM, LLMEngine, SamplingParams
from kv_transfer.base import InstanceRef, LocalRank, RecvSpec, TransferState
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.shm import ShmEndpoint, ShmKVStorage
from kv_transfer.torch_dist import TorchDistEndpoint
from kv_transfer.transport import Endpoint

MAX_TOKENS = 8
PROMPT_LENGTHS = {"short": 7, "chunked": 100, "two-blocks": 32, "never-sent": 21}


def _prompts() -> dict[str, list[int]]:
    rng = random.Random(3)
    return {rid: [rng.randrange(3, 49152) for _ in range(n)] for rid, n in PROMPT_LENGTHS.items()}


def _greedy() -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> dict[str, list[int]]:
    """What one engine generates on its own, with the same chunking as the prefill one."""
    setup = EngineSetup(str(tiny_model_dir), "ref", "-", "-", "-")
    cfg = setup.config()
    llm = LLM(
        cfg.model,
        num_threads=1,
        kv_cache_bytes=cfg.kv_cache_bytes,
        max_model_len=cfg.max_model_len,
        max_num_batched_tokens=cfg.max_num_batched_tokens,
    )
    prompts = _prompts()
    outs = llm.generate(list(prompts.values()), _greedy())
    return {rid: out.token_ids for rid, out in zip(prompts, outs, strict=True)}


@pytest.fixture
def decode_engine(
    request: pytest.FixtureRequest, tiny_model_dir: Path, redis_url: str, cluster_name: str
) -> Iterator[tuple[LLMEngine, KVReceiver, ShmKVStorage | None]]:
    transport = request.param
    setup = EngineSetup(
        str(tiny_model_dir),
        "decode-0",
        transport,
        redis_url,
        cluster_name,
        max_num_batched_tokens=256,
    )
    storage = ShmKVStorage() if transport == "shm" else None
    engine = LLMEngine(setup.config(), kv_storage=storage)
    mc = engine.model_config
    geo = KVGeometry(mc.num_layers, mc.num_kv_heads)
    store = setup.store()
    endpoint: Endpoint = (
        ShmEndpoint(store, storage.segment, geo)
        if storage is not None and storage.segment is not None
        else TorchDistEndpoint(store)
    )
    receiver = KVReceiver(LocalRank("decode-0"), engine.kv_cache, geo, endpoint)
    yield engine, receiver, storage
    receiver.close()
    if storage is not None and storage.segment is not None:
        storage.segment.close()


@pytest.mark.parametrize("decode_engine", ["torch_dist", "shm"], indirect=True)
def test_disaggregated_greedy_matches_one_engine(
    spawn: Spawn,
    decode_engine: tuple[LLMEngine, KVReceiver, ShmKVStorage | None],
    reference: dict[str, list[int]],
    tiny_model_dir: Path,
    redis_url: str,
    cluster_name: str,
) -> None:
    engine, receiver, storage = decode_engine
    transport = "shm" if storage is not None else "torch_dist"
    pre = EngineSetup(str(tiny_model_dir), "prefill-0", transport, redis_url, cluster_name)
    prefill = spawn(prefill_engine_main, pre)
    prompts = _prompts()
    free_before = engine.block_pool.num_free

    source = InstanceRef("prefill-0")
    for rid, prompt in prompts.items():
        ids = engine.reserve_remote_prefill(rid, prompt, _greedy())
        timeout = 2.0 if rid == "never-sent" else 30.0
        receiver.expect(RecvSpec(f"xfer-{rid}", tuple(ids), source, 0, timeout))
    sent = [(rid, f"xfer-{rid}", p) for rid, p in prompts.items() if rid != "never-sent"]
    tag, first, sender_states = prefill.call("prefill", sent, InstanceRef("decode-0"), 30.0)
    assert tag == "prefilled" and set(first) == {rid for rid, _, _ in sent}
    assert set(sender_states.values()) == {("done", None)}

    pending = set(prompts)
    deadline = time.monotonic() + 10
    while pending and time.monotonic() < deadline:
        for rid in list(pending):
            status = receiver.poll(f"xfer-{rid}")
            if status.state is TransferState.DONE:
                engine.commit_remote_prefill(rid, first[rid])
                pending.discard(rid)
            elif status.state is TransferState.FAILED:
                assert rid == "never-sent", status.reason
                engine.fail_remote_prefill(rid)
                pending.discard(rid)
        time.sleep(0.005)
    assert not pending
    assert engine.num_remote_prefill_fallbacks == 1

    outputs: dict[str, list[int]] = {}
    deadline = time.monotonic() + 60
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        for out in engine.step():
            if out.finished:
                outputs[out.request_id] = out.token_ids
    assert outputs == reference

    # Leak checks on both sides.
    assert receiver.num_active == 0
    assert engine.block_pool.num_free == free_before
    endpoint = receiver.endpoint
    if isinstance(endpoint, ShmEndpoint):
        assert endpoint.num_free_slots == endpoint.num_slots
    assert prefill.call("close") == (
        "closed",
        {"active": 0, "hooked": 0, "pinned": 0, "blocks_in_use": 0, "unfinished": False},
    )
    receiver.close()
    if storage is not None and storage.segment is not None:
        storage.segment.close()
    assert own_segments() == []
    assert kv_keys(redis_url, cluster_name) == []
