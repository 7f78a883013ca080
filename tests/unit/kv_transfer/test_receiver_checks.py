"""The receiver's check of each DATA header against the plan and the stream positions.

A decode rank of a PP=2 instance (layers 2-3 of 4) receives from a TP=2 prefill
instance: sender rank 0 sends head 0 and rank 1 head 1, each for both layers. Headers
are handed to the receiver as a transport would; payloads count as already in place.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch

from engine.kv_cache import KVCache
from kv_transfer.base import (
    InstanceRef,
    LocalRank,
    Parallelism,
    RankId,
    RecvSpec,
    TransferState,
)
from kv_transfer.fake import FakeFabric
from kv_transfer.header import Header, MessageKind
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.regions import region_of
from kv_transfer.testing import rank_layout
from kv_transfer.transport import Peer

GEO = KVGeometry(4, 2)
SOURCE = InstanceRef("p", Parallelism(tp=2))
DEC = LocalRank("d", Parallelism(pp=2), pp_rank=1)
BLOCKS = (5, 6, 7, 8)
CACHE = KVCache(rank_layout(GEO, DEC, 8, 4, 16, torch.float32))


@pytest.fixture
def receiver() -> Iterator[KVReceiver]:
    recv = KVReceiver(DEC, CACHE, GEO, FakeFabric().endpoint())
    recv.expect(RecvSpec("t", BLOCKS, SOURCE))
    yield recv
    recv.close()
    assert recv.num_active == 0


def _peer(rank: int) -> Peer:
    return Peer(RankId("p", rank), SOURCE.parallel, b"t" * 16)


def _data(layer: int, count: int, head: int, block_start: int, block_count: int = 2) -> Header:
    """A DATA header whose payload fits the destination (its part on this rank)."""
    local = range(max(0, layer - 2), min(2, max(0, layer - 2) + count))
    ids = BLOCKS[block_start : block_start + block_count]
    region = region_of(CACHE.tensor, local, head, head + 1, ids)
    return Header(
        MessageKind.DATA,
        "t",
        0,
        layer=layer,
        head_start=head,
        head_count=1,
        block_start=block_start,
        block_count=block_count,
        dtype=region.dtype,
        shape=region.shape,
        nbytes=region.nbytes,
        layer_count=count,
    )


def _deliver(recv: KVReceiver, rank: int, header: Header) -> bool:
    """Prepare and land one message, as a transport does; False if it was refused."""
    target = recv.prepare(_peer(rank), header, direct_ok=False)
    if target is not None:
        recv.land(_peer(rank), header, target, None)
    return target is not None


def _reason(recv: KVReceiver) -> str:
    status = recv.poll("t")
    assert status.state is TransferState.FAILED
    return status.reason or ""


@pytest.mark.parametrize(
    ("rank", "header"),
    [
        (0, _data(2, 2, 1, 0)),  # rank 1's head
        (1, _data(0, 1, 1, 0)),  # a layer of the other decode rank
        (1, _data(3, 2, 1, 0)),  # runs past this rank's layers
        (2, _data(2, 1, 0, 0)),  # no such sender rank in the plan
    ],
    ids=["heads", "layer-elsewhere", "past-the-end", "rank"],
)
def test_a_slice_outside_the_plan_fails_the_transfer(
    receiver: KVReceiver, rank: int, header: Header
) -> None:
    assert not _deliver(receiver, rank, header)
    assert "unexpected slice" in _reason(receiver)


def test_a_span_over_layers_at_different_blocks_is_a_lost_message(receiver: KVReceiver) -> None:
    assert _deliver(receiver, 0, _data(3, 1, 0, 0))  # layer 3 now expects block 2
    assert not _deliver(receiver, 0, _data(2, 2, 0, 0))
    assert "layer 3: expected block 2, got 0 (lost or repeated" in _reason(receiver)


def test_an_end_with_layers_missing_counts_them(receiver: KVReceiver) -> None:
    assert _deliver(receiver, 1, _data(2, 2, 1, 0))
    receiver.land(_peer(1), Header(MessageKind.END, "t", 1), None, None)
    assert "ended with 2 layer slices incomplete" in _reason(receiver)


def test_single_layers_and_spans_land_every_slice_once(receiver: KVReceiver) -> None:
    steps = [
        (0, _data(3, 1, 0, 0)),
        (1, _data(2, 2, 1, 0, 4)),  # completes two slices at once
        (0, _data(2, 1, 0, 0, 1)),
        (0, _data(2, 1, 0, 1, 1)),
        (0, _data(2, 2, 0, 2)),  # both of rank 0's layers at once, from block 2
    ]
    for rank, header in steps:
        assert receiver.poll("t").state is not TransferState.DONE
        assert _deliver(receiver, rank, header)
    assert receiver.poll("t").state is TransferState.DONE
