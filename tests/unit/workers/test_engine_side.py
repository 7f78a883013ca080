"""The workers' engine side without Ray: the engine thread and its streams, and the
whole remote-prefill lifecycle between two real engines over kv_transfer's in-process
fake transport, with the decode and the prefill started at the same time (in either
order): the first token rides with the KV, the decode side learns the end from its
receiver, and every fallback and abort; each test ends with a leak check."""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import pytest

from decode_worker.chunks import ChunkBuilder
from decode_worker.remote_kv import RemoteKV
from engine import LLM, EngineConfig, LLMEngine, Resume, SamplingParams
from engine.block_pins import BlockPins
from engine.tokenizer import IncrementalDetokenizer
from kv_transfer.base import InstanceRef, LocalRank, SendSpec, TransferState, TransferStatus
from kv_transfer.engine_hook import SendHook
from kv_transfer.fake import FakeFabric
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import MemoryRendezvous
from kv_transfer.sender import KVSender, SenderConfig
from worker.engine_loop import EngineLoop, EngineStopped
from worker.messages import FallbackReason, RemotePrefillPlan, TokenChunk, WorkerRequest

T = TypeVar("T")
MAX_TOKENS = 10
PROMPT = list(range(100, 140))  # 40 tokens: two full blocks and a partial one
WAIT_S = 30.0


def _config(model_dir: Path) -> EngineConfig:
    return EngineConfig(
        model=str(model_dir),
        num_threads=1,
        kv_cache_bytes=2 << 20,
        max_model_len=256,
        max_num_batched_tokens=16,  # prompts prefill in chunks
    )


def _greedy(**kw: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True, **kw)


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path) -> LLM:
    return LLM(str(tiny_model_dir), num_threads=1, kv_cache_bytes=2 << 20, max_model_len=256)


def _on(loop: EngineLoop, fn: Callable[[], T]) -> T:
    return loop.submit(fn).result(timeout=WAIT_S)


async def _collect(
    loop: EngineLoop,
    rid: str,
    start: Callable[[], object],
    info: Callable[[], object] = lambda: None,
) -> list[TokenChunk]:
    stream = loop.open_stream(rid)
    await loop.call(start)
    builder = ChunkBuilder(len(PROMPT))
    chunks: list[TokenChunk] = []
    while not chunks or not chunks[-1].finished:
        chunks.append(builder.build(await stream.get(WAIT_S), info()))  # type: ignore[arg-type]
    return chunks


def test_engine_loop_streams_a_request_and_cleans_up(tiny_model_dir: Path, reference: LLM) -> None:
    want = reference.generate([PROMPT], _greedy())[0]
    loop = EngineLoop(LLMEngine(_config(tiny_model_dir)), name="t").start()
    try:
        chunks = asyncio.run(
            _collect(loop, "r1", lambda: loop.engine.add_request("r1", PROMPT, _greedy()))
        )
        assert [t for c in chunks for t in c.token_ids] == want.token_ids
        assert "".join(c.text for c in chunks) == want.text
        final = chunks[-1].final
        assert final is not None and final.completion_tokens == MAX_TOKENS
        assert final.prompt_tokens == len(PROMPT) and not final.disaggregated
        assert loop.num_streams == 0
        time.sleep(0.05)
        load = loop.load_report()
        assert load.running_seqs == 0 and load.free_kv_blocks == load.total_kv_blocks
        with pytest.raises(ValueError, match="already has a stream"):
            asyncio.run(_double_open(loop))
    finally:
        loop.stop()
    with pytest.raises(EngineStopped):
        loop.check()
    with pytest.raises(EngineStopped):
        loop.submit(lambda: None).result(timeout=1)


async def _double_open(loop: EngineLoop) -> None:
    loop.open_stream("dup")
    try:
        loop.open_stream("dup")
    finally:
        loop.close_stream("dup")


def test_abort_frees_blocks(tiny_model_dir: Path) -> None:
    loop = EngineLoop(LLMEngine(_config(tiny_model_dir)), name="t").start()
    try:
        engine = loop.engine

        async def run() -> None:
            stream = loop.open_stream("long")
            params = dataclasses.replace(_greedy(), max_tokens=200)
            await loop.call(lambda: engine.add_request("long", PROMPT, params))
            await stream.get(WAIT_S)
            loop.close_stream("long")
            await loop.call(lambda: engine.abort_request("long"))

        asyncio.run(run())
        assert _on(loop, lambda: (engine.num_requests, engine.block_pool.num_free)) == (
            0,
            engine.block_pool.num_blocks,
        )
    finally:
        loop.stop()


# -- remote prefill between two engines ----------------------------------------------------


@dataclass
class Pair:
    prefill: EngineLoop
    hook: SendHook
    pins: BlockPins
    sender: KVSender
    decode: EngineLoop
    remote: RemoteKV
    store: MemoryRendezvous

    async def prefill_prompt(
        self,
        rid: str,
        params: SamplingParams,
        prompt: list[int] = PROMPT,
        resume: Resume | None = None,
    ) -> TransferStatus:
        """What the prefill worker does: compute and push (the first token with the
        KV; a resumed request's tokens so far are computed and pushed too, and the token
        after them sampled), wait for the send, unpin; the sender's end state."""
        stream = self.prefill.open_stream(rid)
        tid = f"x-{rid}"

        def start() -> None:
            self.hook.add(rid, SendSpec(tid, InstanceRef("decode-0"), 0, 10.0))
            done = len(resume.output_token_ids) if resume is not None else 0
            first = dataclasses.replace(params, max_tokens=done + 1)
            self.prefill.engine.add_request(rid, prompt, first, resume)

        await self.prefill.call(start)
        while not (await stream.get(WAIT_S))[-1].finished:
            pass
        self.prefill.close_stream(rid)
        deadline = time.monotonic() + WAIT_S
        while not (status := self.sender.poll(tid)).terminal:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.001)
        while self.sender.reading(tid):
            await asyncio.sleep(0.001)
        await self.prefill.call(lambda: self.pins.release(tid))
        return status

    async def decode_chunks(self, req: WorkerRequest, start: bool = True) -> list[TokenChunk]:
        """What the decode worker does: start (hold blocks, register), then stream."""
        rid = req.request_id
        stream = self.decode.open_stream(rid)
        if start:
            assert await self.decode.call(lambda: self.remote.start(req)) == ""
        builder = ChunkBuilder(len(req.prompt_token_ids))
        chunks: list[TokenChunk] = []
        while not chunks or not chunks[-1].finished:
            chunks.append(builder.build(await stream.get(WAIT_S), self.remote.info(rid)))
        self.decode.close_stream(rid)
        return chunks

    def run(
        self, req: WorkerRequest, params: SamplingParams, decode_first: bool = True
    ) -> tuple[list[TokenChunk], TransferStatus]:
        """The decode request and the prefill at the same time (the router's way)."""

        async def both() -> tuple[list[TokenChunk], TransferStatus]:
            rid = req.request_id
            prefill = self.prefill_prompt(rid, params, PROMPT, req.resume)
            if decode_first:
                chunks = asyncio.ensure_future(self.decode_chunks(req))
                sent = await prefill
            else:  # the prefill's sender waits for the registration
                sending = asyncio.ensure_future(prefill)
                await asyncio.sleep(0.05)
                chunks = asyncio.ensure_future(self.decode_chunks(req))
                sent = await sending
            return await chunks, sent

        return asyncio.run(both())

    def assert_clean(self) -> None:
        def state(loop: EngineLoop) -> tuple[int, int, int]:
            e = loop.engine
            return e.num_requests, e.block_pool.num_blocks - e.block_pool.num_free, loop.num_streams

        assert _on(self.prefill, lambda: state(self.prefill)) == (0, 0, 0)
        assert _on(self.decode, lambda: state(self.decode)) == (0, 0, 0)
        assert (self.sender.num_active, self.remote.num_active, self.hook.num_requests) == (0, 0, 0)
        assert self.pins.num_pinned == 0
        assert _on(self.decode, lambda: self.remote.num_pending) == 0
        assert not _on(self.decode, lambda: self.decode.engine.scheduler.remote)
        assert self.store.keys() == [], "transfer registrations left"


@pytest.fixture
def pair(tiny_model_dir: Path, request: pytest.FixtureRequest) -> Iterator[Pair]:
    """`request.param` may give the prefill engine `num_blocks` and a token budget."""
    fabric, store = FakeFabric(), MemoryRendezvous()
    hook = SendHook(16, first_token=True)
    d_engine = LLMEngine(_config(tiny_model_dir))
    p_config = _config(tiny_model_dir)
    tight: dict[str, int] = getattr(request, "param", {})
    if tight:  # the same model and block size as the decode engine's
        p_config = dataclasses.replace(
            p_config,
            kv_cache_bytes=tight["num_blocks"] * d_engine.kv_cache.layout.block_bytes,
            max_model_len=tight["num_blocks"] * p_config.block_size,
            max_num_batched_tokens=tight["max_num_batched_tokens"],
            enable_prefix_caching=bool(tight.get("prefix_caching", True)),
        )
    p_engine = LLMEngine(p_config, layer_hook=hook, output_hook=hook.on_outputs)
    assert not tight or p_engine.block_pool.num_blocks == tight["num_blocks"]
    mc = p_engine.model_config
    geo = KVGeometry(mc.num_layers, mc.num_kv_heads)
    config = SenderConfig(register_timeout_s=2.0)
    me = LocalRank("prefill-0")
    sender = KVSender(me, p_engine.kv_cache, geo, fabric.connector(), config, registry=store)
    pins = BlockPins(p_engine.block_pool)
    hook.bind(sender, pins)
    decode = EngineLoop(d_engine, name="decode")
    remote = RemoteKV(d_engine, decode.submit, decode.post)
    receiver = KVReceiver(
        LocalRank("decode-0"),
        d_engine.kv_cache,
        geo,
        fabric.endpoint(),
        registry=store,
        on_end=remote.ended,
    )
    remote.bind(receiver)
    prefill = EngineLoop(p_engine, name="prefill").start()
    p = Pair(prefill, hook, pins, sender, decode.start(), remote, store)
    yield p
    p.prefill.stop()
    p.decode.stop()
    sender.close()
    receiver.close()


def _request(rid: str, params: SamplingParams, timeout_s: float = 10.0) -> WorkerRequest:
    plan = RemotePrefillPlan(f"x-{rid}", "prefill-0", timeout_s)
    return WorkerRequest(rid, tuple(PROMPT), params, time.time(), plan)


@pytest.mark.parametrize("decode_first", [True, False], ids=["decode_first", "prefill_first"])
def test_remote_prefill_commits_and_matches(pair: Pair, reference: LLM, decode_first: bool) -> None:
    params = _greedy(logprobs=2)
    want = reference.generate([PROMPT], params)[0]
    chunks, sent = pair.run(_request("r", params), params, decode_first)
    assert sent.state is TransferState.DONE
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    assert "".join(c.text for c in chunks) == want.text
    # The first token's logprobs were sampled on the prefill engine and came in its END.
    # Each engine picks its CPU matmul paths by measuring them at load, so two engines
    # may sum in another order: the same tokens, logprobs equal to fp32 rounding.
    assert want.logprobs is not None
    got = [lp for c in chunks for lp in c.logprobs]
    assert [(lp.token_id, [t for t, _ in lp.top]) for lp in got] == [
        (lp.token_id, [t for t, _ in lp.top]) for lp in want.logprobs
    ]
    for a, b in zip(got, want.logprobs, strict=True):
        assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
        assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4)
    final = chunks[-1].final
    assert final is not None and final.disaggregated and not final.fallback_reason
    assert final.kv_transfer_s >= 0 and final.prefill_s == 0
    assert pair.decode.engine.num_remote_prefill_fallbacks == 0
    pair.assert_clean()


def test_a_seeded_request_continues_the_prefill_engines_random_stream(
    pair: Pair, reference: LLM
) -> None:
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=MAX_TOKENS)
    params = dataclasses.replace(params, ignore_eos=True)
    want = reference.generate([PROMPT], params)[0]
    chunks, _ = pair.run(_request("s", params), params)
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    pair.assert_clean()


@pytest.mark.parametrize("k", [1, 6])
def test_a_moved_stream_resumes_through_a_remote_prefill(
    pair: Pair, reference: LLM, k: int
) -> None:
    """A stream that broke after k tokens: the prefill engine computes the prompt and
    those tokens and samples the next one with the generator past k draws; the decode
    side goes on with the rest of the undisturbed run's tokens and text."""
    params = SamplingParams(temperature=1.0, top_p=0.95, seed=11, max_tokens=MAX_TOKENS)
    params = dataclasses.replace(params, ignore_eos=True)
    want = reference.generate([PROMPT], params)[0]
    detok = IncrementalDetokenizer(reference.engine.tokenizer, PROMPT, [])
    for token in want.token_ids[:k]:
        detok.push(token)
    text_before = detok.text  # what the broken stream's instance had made of them
    sent_chars = max(0, len(text_before) - 1)  # the last character still held back, say
    resume = Resume(tuple(want.token_ids[:k]), sent_chars)
    req = dataclasses.replace(_request(f"m{k}", params), resume=resume)
    chunks, status = pair.run(req, params)
    assert status.state is TransferState.DONE
    assert want.token_ids[:k] + [t for c in chunks for t in c.token_ids] == want.token_ids
    assert text_before[:sent_chars] + "".join(c.text for c in chunks) == want.text
    final = chunks[-1].final
    assert final is not None and final.disaggregated and final.completion_tokens == MAX_TOKENS
    pair.assert_clean()


def _preempted_run(pair: Pair, prompts: dict[str, list[int]]) -> dict[str, list[int]]:
    """Start both prompts in one prefill step; the first finishes and its blocks stay
    pinned until its transfer is over, and the second must be preempted before those
    pins go. The tokens each request decodes."""
    params = _greedy()
    scheduler = pair.prefill.engine.scheduler
    first = next(iter(prompts))
    reqs = {
        rid: WorkerRequest(
            rid, tuple(p), params, time.time(), RemotePrefillPlan(f"x-{rid}", "prefill-0", 10.0)
        )
        for rid, p in prompts.items()
    }

    async def run() -> dict[str, list[int]]:
        for req in reqs.values():
            assert await pair.decode.call(lambda req=req: pair.remote.start(req)) == ""
        decoding = {
            rid: asyncio.ensure_future(pair.decode_chunks(r, False)) for rid, r in reqs.items()
        }
        prefilled = {rid: pair.prefill.open_stream(rid) for rid in reqs}

        def start_both() -> None:  # one command: both land in the same step
            for rid, prompt in prompts.items():
                pair.hook.add(rid, SendSpec(f"x-{rid}", InstanceRef("decode-0"), 0, 10.0))
                pair.prefill.engine.add_request(
                    rid, prompt, dataclasses.replace(params, max_tokens=1)
                )

        await pair.prefill.call(start_both)
        for rid, stream in prefilled.items():
            while not (await stream.get(WAIT_S))[-1].finished:
                pass
            tid = f"x-{rid}"
            deadline = time.monotonic() + WAIT_S
            while pair.sender.poll(tid).state is not TransferState.DONE:
                assert time.monotonic() < deadline, pair.sender.poll(tid)
                await asyncio.sleep(0.001)
            if rid == first:  # its pinned blocks leave the other no room to grow
                while not await pair.prefill.call(lambda: scheduler.num_preemptions > 0):
                    assert time.monotonic() < deadline, "the second prompt was never preempted"
                    await asyncio.sleep(0.001)
            await pair.prefill.call(lambda tid=tid: pair.pins.release(tid))
        tokens: dict[str, list[int]] = {}
        for rid, chunks in decoding.items():
            tokens[rid] = [t for c in await chunks for t in c.token_ids]
        return tokens

    return asyncio.run(run())


@pytest.mark.parametrize("pair", [{"num_blocks": 5, "max_num_batched_tokens": 64}], indirect=True)
def test_a_prompt_preempted_on_the_prefill_engine_still_decodes_right(
    pair: Pair, reference: LLM
) -> None:
    """Two 40-token prompts (3 blocks each) in one step of a 5-block prefill engine: a
    finishes and its blocks stay pinned until its transfer is over; b has sent its first
    block, cannot grow, and is preempted. Its recompute finds that block (pinned, so
    never handed out) by prefix hash, waits for a's pins, and completes. Both decode
    exactly as a single engine."""
    prompts = {"a": PROMPT, "b": [t + 1000 for t in PROMPT]}
    want = reference.generate(list(prompts.values()), _greedy())
    tokens = _preempted_run(pair, prompts)
    assert tokens == {rid: w.token_ids for rid, w in zip(prompts, want, strict=True)}
    assert pair.decode.engine.num_remote_prefill_fallbacks == 0
    pair.assert_clean()


@pytest.mark.parametrize(
    "pair",
    [{"num_blocks": 6, "max_num_batched_tokens": 64, "prefix_caching": False}],
    indirect=True,
)
def test_without_prefix_caching_a_preempted_prompt_resumes_after_its_pinned_blocks(
    pair: Pair, reference: LLM
) -> None:
    """A 6-block prefill engine without prefix caching. x (24 tokens, 2 blocks) and the
    first 40 tokens of c (72 tokens, 5 blocks) share a step; x finishes with its blocks
    pinned, and c, having sent its 2 full blocks (pinned), cannot grow and is
    preempted. Once x's pins go, 4 blocks are free: too few for all of c, but its
    recompute takes back its 2 pinned blocks (never handed out since) and needs only 3.
    Recomputing from scratch instead would wait for c's own pins, that is, for its own
    transfer, until the deadline."""
    prompts = {"x": list(range(200, 224)), "c": list(range(300, 372))}
    want = reference.generate(list(prompts.values()), _greedy())
    tokens = _preempted_run(pair, prompts)
    assert tokens == {rid: w.token_ids for rid, w in zip(prompts, want, strict=True)}
    assert pair.decode.engine.num_remote_prefill_fallbacks == 0
    pair.assert_clean()


def test_a_prefill_that_gives_up_makes_the_decode_side_recompute(
    pair: Pair, reference: LLM
) -> None:
    """The prefill side aborts the transfer (its request failed): ABORT reaches the
    receiver, which ends the transfer; the decode side prefills locally, counted."""
    want = reference.generate([PROMPT], _greedy())[0]

    async def run() -> list[TokenChunk]:
        chunks = asyncio.ensure_future(pair.decode_chunks(_request("f", _greedy())))
        await asyncio.sleep(0.05)
        await pair.prefill.call(
            lambda: pair.sender.open(SendSpec("x-f", InstanceRef("decode-0"), 0, 10.0))
        )
        pair.sender.abort("x-f", "prefill failed")
        return await chunks

    chunks = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    final = chunks[-1].final
    assert final is not None and not final.disaggregated
    assert final.fallback_reason.startswith("transfer failed: sender prefill-0/0 aborted")
    assert final.fallback is FallbackReason.TRANSFER_FAILED
    assert pair.decode.engine.num_remote_prefill_fallbacks == 1
    assert pair.remote.transfer_failures == 1
    pair.assert_clean()


def test_transfer_that_never_comes_times_out_and_falls_back(pair: Pair, reference: LLM) -> None:
    want = reference.generate([PROMPT], _greedy())[0]
    chunks = asyncio.run(pair.decode_chunks(_request("t", _greedy(), timeout_s=0.3)))
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    final = chunks[-1].final
    assert final is not None and final.fallback_reason.startswith("transfer failed: timed out")
    assert final.fallback is FallbackReason.TRANSFER_FAILED
    assert pair.remote.transfer_failures == 1
    pair.assert_clean()


def test_abort_while_waiting_for_the_transfer_frees_everything(pair: Pair) -> None:
    req = _request("a", _greedy())
    engine = pair.decode.engine
    assert _on(pair.decode, lambda: pair.remote.start(req)) == ""
    assert _on(pair.decode, lambda: engine.block_pool.num_free) < engine.block_pool.num_blocks
    assert pair.remote.num_active == 1
    _on(pair.decode, lambda: pair.remote.abort("a"))
    time.sleep(0.05)  # the receiver's end report reaches the engine thread: a no-op
    pair.assert_clean()


def test_start_without_free_blocks_refuses_and_the_sender_fails_at_once(pair: Pair) -> None:
    engine = pair.decode.engine
    hog = _on(pair.decode, lambda: engine.block_pool.allocate(engine.block_pool.num_free - 1))
    try:
        req = _request("n", _greedy())
        reason = _on(pair.decode, lambda: pair.remote.start(req))
        assert reason.startswith("decode_full (no free KV blocks")
        assert pair.remote.num_active == 0 and pair.remote.num_pending == 0
        info = pair.remote.info("n")
        assert info is not None and info.fallback_reason == reason
        pair.remote.forget("n")
        started = time.monotonic()
        sent = asyncio.run(pair.prefill_prompt("n", _greedy()))
        assert sent.state is TransferState.FAILED and "refused" in (sent.reason or "")
        assert time.monotonic() - started < 2.0  # before the registration bound
    finally:
        _on(pair.decode, lambda: engine.block_pool.release(hog))
    pair.assert_clean()


# -- the router tells the decode side that the prefill failed ------------------------------


def test_a_failed_prefill_told_by_the_router_recomputes_at_once(pair: Pair, reference: LLM) -> None:
    """The transfer would wait 60 s; the notice ends it now: the receive slot is freed,
    the prompt recomputed here, counted under its own reason, with the same tokens."""
    want = reference.generate([PROMPT], _greedy())[0]

    async def run() -> list[TokenChunk]:
        chunks = asyncio.ensure_future(pair.decode_chunks(_request("p", _greedy(), 60.0)))
        while not await pair.decode.call(lambda: pair.remote.num_pending):
            await asyncio.sleep(0.005)
        assert pair.remote.num_active == 1  # the receive slot it holds
        await pair.decode.call(lambda: pair.remote.prefill_failed("p", "the instance died"))
        return await asyncio.wait_for(chunks, WAIT_S)

    chunks = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    final = chunks[-1].final
    assert final is not None and not final.disaggregated
    assert final.fallback_reason == "prefill failed: the instance died"
    assert final.fallback is FallbackReason.PREFILL_FAILED
    assert pair.decode.engine.num_remote_prefill_fallbacks == 1
    assert pair.remote.transfer_failures == 0  # no transfer failed: it never began
    pair.assert_clean()


def test_a_prefill_failure_told_before_the_request_came_refuses_its_transfer(
    pair: Pair, reference: LLM
) -> None:
    """The router's two calls race: the notice is remembered, and the request, when it
    comes, is prefilled here with no blocks held for a transfer; a sender that tries
    after all is refused at once."""
    want = reference.generate([PROMPT], _greedy())[0]
    _on(pair.decode, lambda: pair.remote.prefill_failed("e", "boom"))
    assert _on(pair.decode, lambda: pair.remote.num_failed_early) == 1
    req = _request("e", _greedy(), 60.0)

    async def run() -> tuple[list[TokenChunk], TransferStatus]:
        stream = pair.decode.open_stream("e")
        reason = await pair.decode.call(lambda: pair.remote.start(req))
        assert reason == "prefill failed: boom"
        await pair.decode.call(lambda: pair.decode.engine.add_request("e", PROMPT, _greedy()))
        builder, chunks = ChunkBuilder(len(PROMPT)), list[TokenChunk]()
        while not chunks or not chunks[-1].finished:
            chunks.append(builder.build(await stream.get(WAIT_S), pair.remote.info("e")))
        pair.decode.close_stream("e")
        pair.remote.forget("e")
        return chunks, await pair.prefill_prompt("e", _greedy())

    chunks, sent = asyncio.run(run())
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    final = chunks[-1].final
    assert final is not None and final.fallback is FallbackReason.PREFILL_FAILED
    assert sent.state is TransferState.FAILED and "refused" in (sent.reason or "")
    assert _on(pair.decode, lambda: pair.remote.num_failed_early) == 0
    pair.assert_clean()


def test_a_prefill_failure_told_after_the_kv_landed_changes_nothing(
    pair: Pair, reference: LLM
) -> None:
    params = _greedy()
    want = reference.generate([PROMPT], params)[0]
    chunks, sent = pair.run(_request("l", params), params)
    assert sent.state is TransferState.DONE
    _on(pair.decode, lambda: pair.remote.prefill_failed("l", "late"))
    assert [t for c in chunks for t in c.token_ids] == want.token_ids
    final = chunks[-1].final
    assert final is not None and final.disaggregated and final.fallback is None
    assert pair.decode.engine.num_remote_prefill_fallbacks == 0
    pair.assert_clean()


def test_early_prefill_failures_are_bounded(pair: Pair) -> None:
    from decode_worker import remote_kv

    def tell(n: int) -> None:
        for i in range(n):
            pair.remote.prefill_failed(f"gone-{i}", "boom")

    _on(pair.decode, lambda: tell(remote_kv._FAILED_EARLY_MAX + 10))
    assert _on(pair.decode, lambda: pair.remote.num_failed_early) == remote_kv._FAILED_EARLY_MAX
    _on(pair.decode, lambda: pair.remote.abort("gone-1023"))  # an abort forgets it too
    assert _on(pair.decode, lambda: pair.remote.num_failed_early) == remote_kv._FAILED_EARLY_MAX - 1
    pair.assert_clean()
