"""A transfer's completion: the first token rides on END, the receiver reports the end
through `on_end` (no polling), and a sender waits, bounded, for the receiver's
registration, so the decode side may register after the prefill side starts.

Each test ends with a leak check: no active transfer on either side.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import torch

from engine.kv_cache import KVCache
from kv_transfer.base import (
    FirstToken,
    InstanceRef,
    LocalRank,
    Parallelism,
    RecvSpec,
    SendSpec,
    TransferState,
    TransferStatus,
)
from kv_transfer.fake import FakeFabric
from kv_transfer.mapping import KVGeometry, plan
from kv_transfer.receiver import KVReceiver
from kv_transfer.registration import registration_key
from kv_transfer.rendezvous import MemoryRendezvous
from kv_transfer.sender import KVSender, SenderConfig
from kv_transfer.testing import fill, rank_layout, read, reference_kv, shard

GEO = KVGeometry(num_layers=2, num_kv_heads=2)
HEAD_DIM, BLOCK, NUM_BLOCKS = 4, 4, 16
FIRST = FirstToken(42, 1, -0.75, ((42, -0.75), (7, -1.5)), 1.0e9)


def _no_records(pair: Pair, key: str | None = None, timeout_s: float = 5.0) -> bool:
    """The store holds no registration record (or not `key`) within `timeout_s`: the
    receiver writes its records on its own thread."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (pair.store.lookup(key) is None) if key else not pair.store.keys():
            return True
        time.sleep(0.01)
    return False


@dataclass
class Pair:
    store: MemoryRendezvous
    sender: KVSender
    receiver: KVReceiver
    src_cache: KVCache
    dst_cache: KVCache
    ended: list[tuple[str, TransferStatus]]
    ended_event: threading.Event


def _cache(me: LocalRank) -> KVCache:
    return KVCache(rank_layout(GEO, me, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32))


@pytest.fixture
def pair() -> Iterator[Pair]:
    store, fabric = MemoryRendezvous(), FakeFabric()
    dst_me, src_me = LocalRank("decode-0"), LocalRank("prefill-0")
    dst_cache, src_cache = _cache(dst_me), _cache(src_me)
    ended: list[tuple[str, TransferStatus]] = []
    event = threading.Event()

    def on_end(tid: str, status: TransferStatus) -> None:
        ended.append((tid, status))
        event.set()

    receiver = KVReceiver(dst_me, dst_cache, GEO, fabric.endpoint(), registry=store, on_end=on_end)
    config = SenderConfig(register_timeout_s=1.0)
    sender = KVSender(src_me, src_cache, GEO, fabric.connector(), config, registry=store)
    p = Pair(store, sender, receiver, src_cache, dst_cache, ended, event)
    yield p
    sender.close()
    receiver.close()
    assert sender.num_active == 0 and receiver.num_active == 0


def _expect(p: Pair, tid: str, dst: tuple[int, ...], first_token: bool = True) -> None:
    p.receiver.expect(RecvSpec(tid, dst, InstanceRef("prefill-0"), 0, 5.0, first_token))


def _send(p: Pair, tid: str, src: list[int], first: FirstToken | None) -> torch.Tensor:
    ref = reference_kv(GEO, HEAD_DIM, BLOCK, len(src), torch.float32, seed=3)
    fill(p.src_cache, ref, GEO, p.sender.me, src)
    p.sender.open(SendSpec(tid, InstanceRef("decode-0"), 0, 5.0))
    for layer in range(GEO.num_layers):
        p.sender.send_layer(tid, layer, src, 0)
    p.sender.finish(tid, wait=False, first=first)
    return ref


def _wait_sender(p: Pair, tid: str) -> TransferStatus:
    deadline = time.monotonic() + 5.0
    while not (status := p.sender.poll(tid)).terminal:
        assert time.monotonic() < deadline, "the sender never ended"
        time.sleep(0.002)
    return status


def test_done_carries_the_first_token_and_is_reported_once(pair: Pair) -> None:
    dst = (5, 9, 2)
    _expect(pair, "t1", dst)
    ref = _send(pair, "t1", [0, 1, 2], FIRST)
    assert pair.ended_event.wait(5.0)
    ((tid, status),) = pair.ended
    assert tid == "t1" and status.state is TransferState.DONE and status.first == FIRST
    assert pair.receiver.poll("t1").first == FIRST
    assert torch.equal(read(pair.dst_cache, list(dst)), shard(ref, GEO, pair.receiver.me))
    assert _wait_sender(pair, "t1").state is TransferState.DONE
    assert _no_records(pair)  # the end withdrew the registration


def test_every_slice_landed_is_not_done_without_the_first_token(pair: Pair) -> None:
    _expect(pair, "t2", (1, 2))
    _send(pair, "t2", [3, 4], None)  # END without the first token
    assert _wait_sender(pair, "t2").state is TransferState.DONE
    assert not pair.ended_event.wait(0.2)
    assert pair.receiver.poll("t2").state is TransferState.TRANSFERRING
    pair.receiver.abort("t2", "no first token")
    ((_, status),) = pair.ended
    assert status.state is TransferState.FAILED and status.reason == "no first token"


def test_a_receiver_that_does_not_ask_for_it_is_done_at_the_last_slice(pair: Pair) -> None:
    _expect(pair, "t3", (1, 2), first_token=False)
    _send(pair, "t3", [3, 4], FIRST)
    assert pair.ended_event.wait(5.0)
    assert pair.ended[0][1].state is TransferState.DONE
    _wait_sender(pair, "t3")


def test_the_sender_waits_for_a_late_registration(pair: Pair) -> None:
    _send(pair, "t4", [0, 1], FIRST)  # sending starts before the receiver expects it
    time.sleep(0.05)
    assert pair.sender.poll("t4").state is not TransferState.FAILED
    _expect(pair, "t4", (7, 8))
    assert pair.ended_event.wait(5.0)
    assert pair.ended[0][1].first == FIRST
    assert _wait_sender(pair, "t4").state is TransferState.DONE
    assert _no_records(pair, registration_key("decode-0", 0, "t4"))


def test_a_refused_transfer_fails_the_sender_at_once(pair: Pair) -> None:
    pair.receiver.refuse("t5", "no free KV blocks")
    start = time.monotonic()
    _send(pair, "t5", [0, 1], FIRST)
    status = _wait_sender(pair, "t5")
    assert status.state is TransferState.FAILED and "refused" in (status.reason or "")
    assert time.monotonic() - start < 0.9  # well before the 1 s registration bound
    assert pair.ended == []  # never expected here: nothing to report
    assert _no_records(pair)  # the sender consumed the refusal


def test_no_registration_fails_the_sender_at_its_bound(pair: Pair) -> None:
    _send(pair, "t6", [0, 1], FIRST)
    status = _wait_sender(pair, "t6")
    assert status.state is TransferState.FAILED
    assert "did not register" in (status.reason or "")


def test_a_timeout_is_reported_through_on_end(pair: Pair) -> None:
    pair.receiver.expect(RecvSpec("t7", (1,), InstanceRef("prefill-0"), 0, 0.1, True))
    assert pair.ended_event.wait(5.0)
    ((_, status),) = pair.ended
    assert status.state is TransferState.FAILED and "no first token" in (status.reason or "")


def test_parallel_layouts_route_the_first_token_to_rank_zero() -> None:
    """Sender rank 0 (which samples) always has a route to receiver rank 0 (which
    drives the decode engine), whatever the two layouts."""
    geo = KVGeometry(num_layers=4, num_kv_heads=2)
    layouts = [Parallelism(tp, pp) for tp in (1, 2, 4) for pp in (1, 2)]
    for src in layouts:
        for dst in layouts:
            assert any(r.src == 0 and r.dst == 0 for r in plan(geo, src, dst)), (src, dst)
