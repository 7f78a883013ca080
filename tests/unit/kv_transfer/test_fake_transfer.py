"""Sender and receiver over the in-process fake: the whole protocol, step by step.

Every test ends with a leak check: no active transfers on either side and every
destination block back in the decode pool.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import pytest
import torch

from engine.block_pool import BlockPool
from engine.kv_cache import KVCache
from kv_transfer.base import (
    EndSink,
    InstanceRef,
    LocalRank,
    Parallelism,
    RecvSpec,
    SendSpec,
    TransferState,
    TransferStatus,
)
from kv_transfer.fake import FakeEndpoint, FakeFabric, FakeLink
from kv_transfer.faults import Fault, FaultKind, FaultyConnector
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender, SenderConfig
from kv_transfer.testing import fill, rank_layout, read, reference_kv, shard
from kv_transfer.transport import Connector, Link

HEAD_DIM, BLOCK, NUM_BLOCKS = 8, 4, 48


@dataclass
class Instance:
    ref: InstanceRef
    ranks: list[LocalRank]
    caches: list[KVCache]
    pool: BlockPool
    roles: list[KVSender] | list[KVReceiver] = field(default_factory=list)


def _instance(geo: KVGeometry, name: str, parallel: Parallelism, dtype: torch.dtype) -> Instance:
    ranks = [LocalRank(name, parallel, *parallel.coords(r)) for r in range(parallel.world_size)]
    caches = [KVCache(rank_layout(geo, me, HEAD_DIM, BLOCK, NUM_BLOCKS, dtype)) for me in ranks]
    # Scramble the free list: runs of three consecutive ids in random order.
    pool = BlockPool(NUM_BLOCKS)
    runs = [pool.allocate(3) for _ in range(NUM_BLOCKS // 3)]
    random.Random(name).shuffle(runs)
    for run in runs:
        pool.release(run)
    return Instance(InstanceRef(name, parallel), ranks, caches, pool)


class Cluster:
    def __init__(
        self, geo: KVGeometry, dtype: torch.dtype = torch.float32, in_place: bool = False
    ) -> None:
        self.geo, self.dtype = geo, dtype
        self.fabric = FakeFabric(in_place)
        self.decodes: list[Instance] = []
        self.prefills: list[Instance] = []

    def decode(self, name: str, parallel: Parallelism) -> Instance:
        inst = _instance(self.geo, name, parallel, self.dtype)
        inst.roles = [
            KVReceiver(me, cache, self.geo, self.fabric.endpoint())
            for me, cache in zip(inst.ranks, inst.caches, strict=True)
        ]
        self.decodes.append(inst)
        return inst

    def prefill(
        self,
        name: str,
        parallel: Parallelism,
        faults: Sequence[Fault] = (),
        spans: bool = False,
        span_bytes: int | None = None,
        on_end: EndSink | None = None,
    ) -> Instance:
        inst = _instance(self.geo, name, parallel, self.dtype)
        senders = []
        for me, cache in zip(inst.ranks, inst.caches, strict=True):
            connector: Connector = self.fabric.connector()
            if faults:
                connector = FaultyConnector(connector, faults, on_kill=_sever, spans=spans)
            config = SenderConfig(max_span_bytes=span_bytes)
            senders.append(KVSender(me, cache, self.geo, connector, config, on_end=on_end))
        inst.roles = senders
        self.prefills.append(inst)
        return inst

    def close(self) -> None:
        for inst in self.prefills + self.decodes:
            for role in inst.roles:
                role.close()


def _sever(link: Link) -> None:
    link.close()


@pytest.fixture
def cluster_factory() -> Iterator[list[Cluster]]:
    made: list[Cluster] = []
    yield made
    for c in made:
        c.close()


def _wait(
    roles: Sequence[KVSender | KVReceiver], tid: str, limit: float = 5.0
) -> list[TransferStatus]:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        states = [role.poll(tid) for role in roles]
        if all(s.terminal for s in states):
            return states
        time.sleep(0.002)
    raise AssertionError(f"transfer {tid} did not end within {limit}s: {states}")


@dataclass
class Transfer:
    tid: str
    src_blocks: list[int]
    dst_blocks: list[int]
    ref: torch.Tensor


def start(
    c: Cluster,
    pre: Instance,
    dec: Instance,
    tid: str,
    num_blocks: int,
    seed: int = 0,
    timeout_s: float = 5.0,
    first_block: int = 0,
) -> Transfer:
    ref = reference_kv(c.geo, HEAD_DIM, BLOCK, num_blocks, c.dtype, seed)
    src = pre.pool.allocate(num_blocks)
    dst = dec.pool.allocate(num_blocks - first_block)
    for me, cache in zip(pre.ranks, pre.caches, strict=True):
        fill(cache, ref, c.geo, me, src)
    for receiver in dec.roles:
        assert isinstance(receiver, KVReceiver)
        receiver.expect(RecvSpec(tid, tuple(dst), pre.ref, first_block, timeout_s))
    for sender in pre.roles:
        assert isinstance(sender, KVSender)
        sender.open(SendSpec(tid, dec.ref, first_block, timeout_s))
    return Transfer(tid, src, dst, ref)


def push(
    c: Cluster,
    pre: Instance,
    t: Transfer,
    chunks: Sequence[int] | None = None,
    finish: bool = True,
) -> None:
    """Every prefill rank sends its layers chunk by chunk, like the engine hook."""
    bounds = [0, *(chunks or []), len(t.src_blocks)]
    for lo, hi in itertools.pairwise(bounds):
        for me, sender in zip(pre.ranks, pre.roles, strict=True):
            assert isinstance(sender, KVSender)
            for layer in c.geo.layers(me.parallel, me.pp_rank):
                sender.send_layer(t.tid, layer, t.src_blocks[lo:hi], lo)
    if finish:
        for sender in pre.roles:
            assert isinstance(sender, KVSender)
            sender.finish(t.tid)


def end(
    c: Cluster, pre: Instance, dec: Instance, t: Transfer
) -> tuple[list[TransferStatus], list[TransferStatus]]:
    """Wait for both sides, free both sides' blocks, return (sender, receiver) states."""
    send_states = _wait(pre.roles, t.tid)
    recv_states = _wait(dec.roles, t.tid)
    pre.pool.release(t.src_blocks[::-1])
    dec.pool.release(t.dst_blocks[::-1])
    return send_states, recv_states


def assert_landed(c: Cluster, dec: Instance, t: Transfer, first_block: int = 0) -> None:
    for me, cache in zip(dec.ranks, dec.caches, strict=True):
        want = shard(t.ref, c.geo, me)[:, :, first_block:]
        assert torch.equal(read(cache, t.dst_blocks), want), f"rank {me} differs"


def assert_no_leaks(c: Cluster) -> None:
    for inst in c.prefills + c.decodes:
        assert all(role.num_active == 0 for role in inst.roles)
        assert inst.pool.num_free == NUM_BLOCKS
    # Every sender lets go of its sources, once its pump is past each transfer's end.
    senders = [r for inst in c.prefills for r in inst.roles if isinstance(r, KVSender)]
    deadline = time.monotonic() + 5.0
    while any(s.num_reading for s in senders):
        assert time.monotonic() < deadline, [s.num_reading for s in senders]
        time.sleep(0.001)


def states(statuses: list[TransferStatus]) -> set[TransferState]:
    return {s.state for s in statuses}


LAYOUTS = [
    (Parallelism(1, 1), Parallelism(1, 1)),
    (Parallelism(1, 1), Parallelism(2, 1)),
    (Parallelism(2, 1), Parallelism(1, 1)),
    (Parallelism(2, 1), Parallelism(2, 1)),
    (Parallelism(1, 2), Parallelism(1, 1)),
    (Parallelism(1, 1), Parallelism(1, 2)),
    (Parallelism(2, 2), Parallelism(4, 1)),
    (Parallelism(4, 1), Parallelism(2, 2)),
    (Parallelism(8, 1), Parallelism(1, 2)),  # replicated heads on the sender
    (Parallelism(1, 1), Parallelism(8, 1)),  # replicated heads on the receiver
]


@pytest.mark.parametrize("in_place", [False, True], ids=["staged", "in-place"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("src,dst", LAYOUTS)
def test_m_to_n_is_bit_exact(
    cluster_factory: list[Cluster],
    src: Parallelism,
    dst: Parallelism,
    dtype: torch.dtype,
    in_place: bool,
) -> None:
    c = Cluster(KVGeometry(num_layers=4, num_kv_heads=4), dtype, in_place)
    cluster_factory.append(c)
    pre, dec = c.prefill("prefill-0", src), c.decode("decode-0", dst)
    t = start(c, pre, dec, "t1", num_blocks=7)
    push(c, pre, t)
    send_states, recv_states = end(c, pre, dec, t)
    assert states(send_states) == states(recv_states) == {TransferState.DONE}
    assert_landed(c, dec, t)
    # Each receiver rank got exactly its own shard of the 7 blocks, nothing more.
    for receiver, cache in zip(dec.roles, dec.caches, strict=True):
        endpoint = receiver.endpoint  # type: ignore[union-attr]
        assert isinstance(endpoint, FakeEndpoint)
        per_block = cache.layout.block_bytes
        assert endpoint.received_bytes == 7 * per_block
    assert_no_leaks(c)


@pytest.mark.parametrize("in_place", [False, True], ids=["staged", "in-place"])
def test_chunked_prefill_and_decode_prefix_hit(
    cluster_factory: list[Cluster], in_place: bool
) -> None:
    c = Cluster(KVGeometry(4, 2), in_place=in_place)
    cluster_factory.append(c)
    pre, dec = c.prefill("p", Parallelism(2, 1)), c.decode("d", Parallelism(1, 2))
    # The decode side already holds prompt blocks 0-1; chunks end at blocks 3 and 6.
    t = start(c, pre, dec, "t1", num_blocks=9, first_block=2)
    push(c, pre, t, chunks=[3, 6])
    send_states, recv_states = end(c, pre, dec, t)
    assert states(recv_states) == states(send_states) == {TransferState.DONE}
    assert_landed(c, dec, t, first_block=2)
    assert_no_leaks(c)


@pytest.mark.parametrize("in_place", [False, True], ids=["staged", "in-place"])
def test_queued_layers_share_a_message_where_the_link_takes_spans(
    cluster_factory: list[Cluster], in_place: bool
) -> None:
    """While the first slice is held up, the other layers queue; the link then gets
    each run of them (same blocks, same receiver rank and heads) as one message, which
    lands in place or is staged and scattered. Either way the blocks land bit-exact."""
    c = Cluster(KVGeometry(num_layers=6, num_kv_heads=2), in_place=in_place)
    cluster_factory.append(c)
    pre = c.prefill("p", Parallelism(), faults=[Fault(FaultKind.DELAY, delay_s=0.3)], spans=True)
    dec = c.decode("d", Parallelism(1, 2))  # layers 0-2 on rank 0, 3-5 on rank 1
    t = start(c, pre, dec, "t1", num_blocks=5)
    push(c, pre, t)
    send_states, recv_states = end(c, pre, dec, t)
    assert states(send_states) == states(recv_states) == {TransferState.DONE}
    assert_landed(c, dec, t)
    received = []
    for receiver in dec.roles:
        endpoint = receiver.endpoint  # type: ignore[union-attr]
        assert isinstance(endpoint, FakeEndpoint)
        received.append(endpoint.received_messages)
    # Layers 3-5 queue while rank 0's first message is delayed.
    assert received[1] == 1 and received[0] in (1, 2)
    assert_no_leaks(c)


@pytest.mark.parametrize("chosen_by", ["sender config", "link"])
def test_spans_hold_at_most_the_chosen_bytes(
    cluster_factory: list[Cluster], monkeypatch: pytest.MonkeyPatch, chosen_by: str
) -> None:
    """Queued layers coalesce into spans of at most `max_span_bytes`: the sender's
    setting where it has one, else the link's own size."""
    c = Cluster(KVGeometry(num_layers=6, num_kv_heads=2))
    cluster_factory.append(c)
    num_blocks = 5
    two_layers = 2 * num_blocks * 2 * BLOCK * 2 * HEAD_DIM * 4  # K and V, 2 heads, fp32
    if chosen_by == "link":
        monkeypatch.setattr(FakeLink, "max_span_bytes", two_layers)
    span_bytes = two_layers if chosen_by == "sender config" else None
    delay = [Fault(FaultKind.DELAY, delay_s=0.3)]
    pre = c.prefill("p", Parallelism(), faults=delay, spans=True, span_bytes=span_bytes)
    dec = c.decode("d", Parallelism())
    t = start(c, pre, dec, "t1", num_blocks=num_blocks)
    push(c, pre, t)
    send_states, recv_states = end(c, pre, dec, t)
    assert states(send_states) == states(recv_states) == {TransferState.DONE}
    assert_landed(c, dec, t)
    endpoint = dec.roles[0].endpoint  # type: ignore[union-attr]
    assert isinstance(endpoint, FakeEndpoint)
    # Two layers a message: 0-1, 2-3, 4-5; or 0 alone (sent before the rest queued),
    # then 1-2, 3-4, 5. Without the limit all six fit in one or two messages.
    assert endpoint.received_messages in (3, 4)
    assert_no_leaks(c)


def test_poll_moves_pending_transferring_done(cluster_factory: list[Cluster]) -> None:
    c = Cluster(KVGeometry(2, 2))
    cluster_factory.append(c)
    pre, dec = c.prefill("p", Parallelism()), c.decode("d", Parallelism())
    sender, receiver = pre.roles[0], dec.roles[0]
    t = start(c, pre, dec, "t1", num_blocks=3)
    assert sender.poll("t1").state is receiver.poll("t1").state is TransferState.PENDING
    assert sender.poll("t1").ended_at is None
    assert isinstance(sender, KVSender)
    began = time.monotonic()
    sender.send_layer("t1", 0, t.src_blocks, 0)
    deadline = time.monotonic() + 2
    while receiver.poll("t1").state is TransferState.PENDING and time.monotonic() < deadline:
        time.sleep(0.001)
    assert receiver.poll("t1").state is TransferState.TRANSFERRING
    assert sender.poll("t1").state is TransferState.TRANSFERRING
    sender.send_layer("t1", 1, t.src_blocks, 0)
    sender.finish("t1")
    send_states, recv_states = end(c, pre, dec, t)
    assert states(recv_states) == states(send_states) == {TransferState.DONE}
    for status in (sender.poll("t1"), receiver.poll("t1")):  # when it ended, not when polled
        assert status.ended_at is not None and began < status.ended_at <= time.monotonic()
    with pytest.raises(KeyError):
        receiver.poll("never-registered")
    assert_no_leaks(c)


def test_two_senders_into_one_receiver(cluster_factory: list[Cluster]) -> None:
    c = Cluster(KVGeometry(4, 4))
    cluster_factory.append(c)
    dec = c.decode("d", Parallelism(2, 1))
    pre_a, pre_b = c.prefill("pa", Parallelism(1, 1)), c.prefill("pb", Parallelism(2, 2))
    ta = start(c, pre_a, dec, "ta", num_blocks=6, seed=1)
    tb = start(c, pre_b, dec, "tb", num_blocks=5, seed=2)
    # Interleave the two transfers' layers.
    for layer_chunk in ([0, 1], [2, 3]):
        for pre, t in ((pre_a, ta), (pre_b, tb)):
            for me, sender in zip(pre.ranks, pre.roles, strict=True):
                assert isinstance(sender, KVSender)
                for layer in c.geo.layers(me.parallel, me.pp_rank):
                    if layer in layer_chunk:
                        sender.send_layer(t.tid, layer, t.src_blocks, 0)
    for pre, t in ((pre_a, ta), (pre_b, tb)):
        for sender in pre.roles:
            assert isinstance(sender, KVSender)
            sender.finish(t.tid)
    for pre, t in ((pre_a, ta), (pre_b, tb)):
        _send_states, recv_states = end(c, pre, dec, t)
        assert states(recv_states) == {TransferState.DONE}
        assert_landed(c, dec, t)
    assert_no_leaks(c)


@pytest.mark.parametrize("kind", [FaultKind.DROP, FaultKind.CORRUPT])
@pytest.mark.parametrize(
    ("after", "in_place", "spans"),
    [(0, False, False), (3, False, False), (0, False, True), (0, True, True)],
    ids=["first", "fourth", "first-span-staged", "first-span-in-place"],
)
def test_drop_or_corruption_fails_the_receiver(
    cluster_factory: list[Cluster], kind: FaultKind, after: int, in_place: bool, spans: bool
) -> None:
    c = Cluster(KVGeometry(4, 2), in_place=in_place)
    cluster_factory.append(c)
    faults = [Fault(kind, after=after)]
    pre = c.prefill("p", Parallelism(1, 1), faults=faults, spans=spans)
    dec = c.decode("d", Parallelism(1, 1))
    t = start(c, pre, dec, "t1", num_blocks=4)
    push(c, pre, t)
    _, recv_states = end(c, pre, dec, t)
    (status,) = recv_states
    assert status.state is TransferState.FAILED
    expect = "checksum mismatch" if kind is FaultKind.CORRUPT else "incomplete"
    assert status.reason is not None and expect in status.reason
    # The next transfer over the same pair is unaffected.
    t2 = start(c, pre, dec, "t2", num_blocks=4, seed=5)
    push(c, pre, t2)
    _, recv_states = end(c, pre, dec, t2)
    assert states(recv_states) == {TransferState.DONE}
    assert_landed(c, dec, t2)
    assert_no_leaks(c)


def test_drop_in_a_chunk_is_caught_by_the_next_chunk(cluster_factory: list[Cluster]) -> None:
    c = Cluster(KVGeometry(2, 2))
    cluster_factory.append(c)
    pre = c.prefill("p", Parallelism(), faults=[Fault(FaultKind.DROP, after=0)])
    dec = c.decode("d", Parallelism())
    t = start(c, pre, dec, "t1", num_blocks=6)
    push(c, pre, t, chunks=[3], finish=False)
    (status,) = _wait(dec.roles, "t1")
    assert status.reason is not None and "lost or repeated" in status.reason
    pre.roles[0].finish("t1")  # type: ignore[union-attr]
    end(c, pre, dec, t)
    assert_no_leaks(c)


def test_delay_only_slows_it_down(cluster_factory: list[Cluster]) -> None:
    c = Cluster(KVGeometry(2, 2))
    cluster_factory.append(c)
    pre = c.prefill("p", Parallelism(), faults=[Fault(FaultKind.DELAY, times=0, delay_s=0.05)])
    dec = c.decode("d", Parallelism())
    t = start(c, pre, dec, "t1", num_blocks=3)
    began = time.monotonic()
    push(c, pre, t)
    _, recv_states = end(c, pre, dec, t)
    assert time.monotonic() - began >= 0.1  # two layers, 50 ms each
    assert states(recv_states) == {TransferState.DONE}
    assert_landed(c, dec, t)
    assert_no_leaks(c)


def test_killed_sender_fails_the_receiver_at_once(cluster_factory: list[Cluster]) -> None:
    c = Cluster(KVGeometry(4, 2))
    cluster_factory.append(c)
    pre = c.prefill("p", Parallelism(), faults=[Fault(FaultKind.KILL, after=2)])
    dec = c.decode("d", Parallelism())
    t = start(c, pre, dec, "t1", num_blocks=4, timeout_s=30)
    push(c, pre, t)
    began = time.monotonic()
    send_states, recv_states = end(c, pre, dec, t)
    assert time.monotonic() - began < 1.0  # not the 30 s timeout
    assert states(send_states) == states(recv_states) == {TransferState.FAILED}
    assert "lost sender" in (recv_states[0].reason or "")
    assert_no_leaks(c)


def test_timeout_fails_both_sides(cluster_factory: list[Cluster]) -> None:
    c = Cluster(KVGeometry(2, 2))
    cluster_factory.append(c)
    pre, dec = c.prefill("p", Parallelism()), c.decode("d", Parallelism())
    t = start(c, pre, dec, "t1", num_blocks=3, timeout_s=0.3)
    pre.roles[0].send_layer("t1", 0, t.src_blocks, 0)  # type: ignore[union-attr]
    began = time.monotonic()
    send_states, recv_states = end(c, pre, dec, t)
    assert 0.2 < time.monotonic() - began < 1.3
    assert states(send_states) == states(recv_states) == {TransferState.FAILED}
    assert "timed out" in (recv_states[0].reason or "")
    assert "timed out" in (send_states[0].reason or "")
    assert_no_leaks(c)


def test_abort_on_either_side(cluster_factory: list[Cluster]) -> None:
    c = Cluster(KVGeometry(2, 2))
    cluster_factory.append(c)
    pre, dec = c.prefill("p", Parallelism()), c.decode("d", Parallelism())
    sender, receiver = pre.roles[0], dec.roles[0]
    assert isinstance(sender, KVSender) and isinstance(receiver, KVReceiver)
    t = start(c, pre, dec, "t1", num_blocks=3)
    sender.send_layer("t1", 0, t.src_blocks, 0)
    sender.abort("t1", "client went away")
    send_states, recv_states = end(c, pre, dec, t)
    assert send_states[0].reason == "client went away"
    assert "aborted" in (recv_states[0].reason or "")

    t2 = start(c, pre, dec, "t2", num_blocks=3)
    before = dec.caches[0].tensor.clone()
    receiver.abort("t2")
    push(c, pre, t2)  # late slices for an aborted transfer land nowhere
    _, recv_states = end(c, pre, dec, t2)
    assert recv_states[0].reason == "aborted"
    assert torch.equal(dec.caches[0].tensor, before)
    assert_no_leaks(c)


def test_bad_calls_are_refused(cluster_factory: list[Cluster]) -> None:
    c = Cluster(KVGeometry(2, 2))
    cluster_factory.append(c)
    pre, dec = c.prefill("p", Parallelism(1, 2)), c.decode("d", Parallelism())
    sender, receiver = pre.roles[0], dec.roles[0]
    assert isinstance(sender, KVSender) and isinstance(receiver, KVReceiver)
    t = start(c, pre, dec, "t1", num_blocks=2)
    with pytest.raises(ValueError):
        receiver.expect(RecvSpec("t1", (0,), pre.ref))  # duplicate id
    with pytest.raises(ValueError):
        receiver.expect(RecvSpec("t9", (NUM_BLOCKS,), pre.ref))  # no such block
    with pytest.raises(ValueError):
        sender.send_layer("t1", 1, t.src_blocks, 0)  # layer 1 is on the other stage
    with pytest.raises(KeyError):
        sender.send_layer("nope", 0, t.src_blocks, 0)
    for s in pre.roles:
        s.abort("t1")  # type: ignore[union-attr]
    receiver.abort("t1")
    end(c, pre, dec, t)
    assert_no_leaks(c)


def test_random_interleavings(cluster_factory: list[Cluster]) -> None:
    """Several transfers, random chunking and interleaving, some aborted midway."""
    rng = random.Random(7)
    c = Cluster(KVGeometry(4, 4))
    cluster_factory.append(c)
    pre, dec = c.prefill("p", Parallelism(2, 1)), c.decode("d", Parallelism(1, 2))
    transfers = [
        start(c, pre, dec, f"t{i}", num_blocks=rng.randint(1, 6), seed=i) for i in range(5)
    ]
    aborted = {"t1", "t3"}
    for t in transfers:
        cut = sorted(rng.sample(range(1, len(t.src_blocks) + 1), k=min(2, len(t.src_blocks))))
        push(c, pre, t, chunks=[x for x in cut if x < len(t.src_blocks)], finish=False)
        if t.tid in aborted:
            dec.roles[0].abort(t.tid)
    for t in transfers:
        for sender in pre.roles:
            sender.finish(t.tid)  # type: ignore[union-attr]
    for t in transfers:
        _, recv_states = end(c, pre, dec, t)
        if t.tid in aborted:
            assert recv_states[0].state is TransferState.FAILED
        else:
            assert states(recv_states) == {TransferState.DONE}
            assert_landed(c, dec, t)
    assert_no_leaks(c)


def test_on_end_reports_each_transfer_once_with_its_terminal_status(
    cluster_factory: list[Cluster],
) -> None:
    c = Cluster(KVGeometry(4, 2))
    cluster_factory.append(c)
    ends: list[tuple[str, TransferState]] = []
    pre = c.prefill("p", Parallelism(1, 1), on_end=lambda tid, s: ends.append((tid, s.state)))
    dec = c.decode("d", Parallelism(1, 1))
    t = start(c, pre, dec, "ok", num_blocks=3)
    push(c, pre, t)
    end(c, pre, dec, t)
    gone = start(c, pre, dec, "gone", num_blocks=2)
    push(c, pre, gone, finish=False)
    for sender in pre.roles:
        assert isinstance(sender, KVSender)
        sender.abort("gone", "test abort")
        sender.abort("gone", "a second abort changes nothing")
    end(c, pre, dec, gone)
    assert ends == [("ok", TransferState.DONE), ("gone", TransferState.FAILED)]
    assert_no_leaks(c)
