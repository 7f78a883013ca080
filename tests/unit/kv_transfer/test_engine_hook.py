"""SendHook: which blocks of which layers it sends, step by step."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from engine.forward_hooks import ScheduledChunk
from engine.outputs import RequestOutput
from engine.sampling import TokenLogprob
from kv_transfer.base import DONE, FirstToken, InstanceRef, SendSpec, TransferStatus
from kv_transfer.engine_hook import SendHook


class RecordingSender:
    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def open(self, spec: SendSpec) -> None:
        self.calls.append(("open", spec.transfer_id, spec.first_block))

    def send_layer(
        self, transfer_id: str, layer: int, block_ids: Sequence[int], first_block: int
    ) -> None:
        self.calls.append(("send", transfer_id, layer, tuple(block_ids), first_block))

    def finish(self, transfer_id: str, wait: bool = True, first: FirstToken | None = None) -> None:
        self.calls.append(("finish", transfer_id) if wait else ("finish-nowait", transfer_id))
        self.first = first

    def poll(self, transfer_id: str) -> TransferStatus:
        return DONE

    def abort(self, transfer_id: str, reason: str = "aborted") -> None:
        self.calls.append(("abort", transfer_id, reason))

    @property
    def num_active(self) -> int:
        return 0

    def close(self) -> None:
        pass


class RecordingPins:
    def __init__(self, sender: RecordingSender) -> None:
        self.calls = sender.calls  # one record, to see pins and sends in order

    def pin(self, key: str, block_ids: Sequence[int]) -> None:
        self.calls.append(("pin", key, tuple(block_ids)))


def _step(hook: SendHook, layers: int, chunks: Sequence[ScheduledChunk]) -> None:
    for layer in range(layers):
        hook.on_layer_done(layer, chunks)
    hook.on_step_done(chunks)


TABLE = (10, 11, 12, 20)  # a 14-token prompt in blocks of 4


def test_chunked_prompt_sends_each_block_once_then_finishes() -> None:
    sender = RecordingSender()
    hook = SendHook(4, sender)
    hook.add("r", SendSpec("t", InstanceRef("d")))
    # Chunk 1 computes tokens 0-5: only block 0 is complete.
    _step(hook, 2, [ScheduledChunk("r", TABLE[:2], 0, 6, False)])
    # Chunk 2 computes 6-13 and completes the prompt: blocks 1-3, the last one partial.
    _step(hook, 2, [ScheduledChunk("r", TABLE, 6, 14, True)])
    assert sender.calls == [
        ("open", "t", 0),
        ("send", "t", 0, (10,), 0),
        ("send", "t", 1, (10,), 0),
        ("send", "t", 0, (11, 12, 20), 1),
        ("send", "t", 1, (11, 12, 20), 1),
        ("finish", "t"),
    ]
    assert hook.num_requests == 0


def test_prefix_cached_blocks_go_with_the_first_chunk_and_decode_hits_are_skipped() -> None:
    sender = RecordingSender()
    hook = SendHook(4, sender, layer_offset=8)
    # The decode side holds block 0; the prefill side had blocks 0-1 cached.
    hook.add("r", SendSpec("t", InstanceRef("d"), first_block=1))
    _step(hook, 1, [ScheduledChunk("r", TABLE, 8, 14, True)])
    assert sender.calls[1:] == [("send", "t", 8, (11, 12, 20), 1), ("finish", "t")]


def test_other_requests_are_ignored_and_discard_aborts() -> None:
    sender = RecordingSender()
    hook = SendHook(4, sender)
    hook.add("r", SendSpec("t", InstanceRef("d")))
    _step(
        hook,
        1,
        [ScheduledChunk("local", (1, 2), 0, 8, True), ScheduledChunk("r", TABLE[:1], 0, 3, False)],
    )  # no full block yet
    assert sender.calls == [("open", "t", 0)]
    hook.discard("r")
    hook.discard("r")  # idempotent
    assert sender.calls[-1] == ("abort", "t", "request aborted")
    assert hook.num_requests == 0


def test_recompute_after_preemption_does_not_resend() -> None:
    sender = RecordingSender()
    hook = SendHook(4, sender)
    hook.add("r", SendSpec("t", InstanceRef("d")))
    _step(hook, 1, [ScheduledChunk("r", TABLE[:2], 0, 8, False)])
    # Preempted: the prompt restarts in new blocks, and completes.
    _step(hook, 1, [ScheduledChunk("r", (30, 31, 32, 33), 0, 14, True)])
    assert sender.calls[1:] == [
        ("send", "t", 0, (10, 11), 0),
        ("send", "t", 0, (32, 33), 2),
        ("finish", "t"),
    ]


def test_unbound_hook_refuses_work() -> None:
    hook = SendHook(4)
    with pytest.raises(RuntimeError):
        hook.add("r", SendSpec("t", InstanceRef("d")))
    hook.bind(RecordingSender())
    with pytest.raises(RuntimeError):
        hook.bind(RecordingSender())


def test_with_pins_every_queued_block_is_pinned_and_finish_does_not_wait() -> None:
    sender = RecordingSender()
    hook = SendHook(4, sender, pins=RecordingPins(sender))
    hook.add("r", SendSpec("t", InstanceRef("d"), first_block=1))
    _step(hook, 1, [ScheduledChunk("r", TABLE[:3], 0, 9, False)])
    # Preempted: blocks 10-11 are freed by the engine, yet a send may still read block
    # 11, which stays pinned; the recompute's new blocks are pinned as they are sent.
    _step(hook, 1, [ScheduledChunk("r", (30, 31, 32, 33), 0, 14, True)])
    assert sender.calls[1:] == [
        ("send", "t", 0, (11,), 1),
        ("pin", "t", (11,)),
        ("send", "t", 0, (32, 33), 2),
        ("pin", "t", (32, 33)),
        ("finish-nowait", "t"),
    ]


def _output(
    rid: str, tokens: list[int], draws: int = 0, lp: TokenLogprob | None = None
) -> RequestOutput:
    return RequestOutput(
        rid,
        [1, 2],
        tokens,
        "",
        True,
        "length",
        logprobs=[lp] if lp else None,
        sampler_draws=draws,
    )


def test_the_sampling_rank_finishes_with_the_first_token() -> None:
    sender = RecordingSender()
    hook = SendHook(4, sender, pins=RecordingPins(sender), first_token=True)
    hook.add("r", SendSpec("t", InstanceRef("d")))
    hook.add("q", SendSpec("u", InstanceRef("d")))
    _step(hook, 1, [ScheduledChunk("r", TABLE, 0, 14, True), ScheduledChunk("q", (1,), 0, 3, True)])
    assert not any(c[0].startswith("finish") for c in sender.calls)  # no token yet
    assert hook.num_requests == 2
    lp = TokenLogprob(7, -0.5, ((7, -0.5), (3, -2.0)))
    hook.on_outputs([_output("other", [1]), _output("r", [7], draws=1, lp=lp)])
    assert sender.calls[-1] == ("finish-nowait", "t")
    first = sender.first
    assert first is not None and (first.token_id, first.draws, first.logprob) == (7, 1, -0.5)
    assert first.top == lp.top and first.sampled_wall > 0
    hook.discard("q", "cancelled")  # aborted between its last chunk and its token
    assert sender.calls[-1] == ("abort", "u", "cancelled") and hook.num_requests == 0
    hook.on_outputs([_output("q", [4])])  # a late output finds nothing to finish
    assert sender.calls[-1] == ("abort", "u", "cancelled")
