"""Each role reports one record per transfer for the metrics: bytes and blocks moved,
duration, and the failure's kind."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import pytest
import torch

from engine.kv_cache import KVCache
from kv_transfer.base import (
    FAILURE_KINDS,
    InstanceRef,
    LocalRank,
    Parallelism,
    RecvSpec,
    SendSpec,
    TransferRecord,
    failure_kind,
)
from kv_transfer.fake import FakeFabric
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender
from kv_transfer.testing import fill, rank_layout, reference_kv

GEO = KVGeometry(num_layers=3, num_kv_heads=2)
ONE = Parallelism(1, 1)
HEAD_DIM, BLOCK, NUM_BLOCKS = 8, 4, 16


def _wait(cond: Callable[[], bool], limit_s: float = 5.0) -> None:
    deadline = time.monotonic() + limit_s
    while not cond():
        assert time.monotonic() < deadline, "not in time"
        time.sleep(0.002)


@pytest.fixture
def roles() -> Iterator[tuple[KVSender, KVReceiver, list[TransferRecord]]]:
    fabric = FakeFabric(False)
    records: list[TransferRecord] = []
    pre, dec = LocalRank("pre", ONE, 0, 0), LocalRank("dec", ONE, 0, 0)
    layout = rank_layout(GEO, pre, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32)
    src, dst = KVCache(layout), KVCache(layout)
    fill(src, reference_kv(GEO, HEAD_DIM, BLOCK, 4, torch.float32, 0), GEO, pre, [0, 1, 2, 3])
    receiver = KVReceiver(dec, dst, GEO, fabric.endpoint(), on_record=records.append)
    sender = KVSender(pre, src, GEO, fabric.connector(), on_record=records.append)
    yield sender, receiver, records
    sender.close()
    receiver.close()


def test_a_done_transfer_reports_the_same_bytes_and_blocks_on_both_sides(
    roles: tuple[KVSender, KVReceiver, list[TransferRecord]],
) -> None:
    sender, receiver, records = roles
    receiver.expect(RecvSpec("t1", (5, 6, 7, 8), InstanceRef("pre", ONE), 0, 5.0))
    sender.open(SendSpec("t1", InstanceRef("dec", ONE), 0, 5.0))
    for layer in range(GEO.num_layers):
        sender.send_layer("t1", layer, [0, 1], 0)
        sender.send_layer("t1", layer, [2, 3], 2)
    sender.finish("t1")
    _wait(lambda: len(records) == 2)
    by_role = {r.role: r for r in records}
    send, recv = by_role["send"], by_role["recv"]
    assert send.ok and recv.ok and send.reason is None
    # 3 layers x 2 heads x 4 blocks x 2 (K, V) x block x head_dim floats
    want = GEO.num_layers * 2 * 4 * 2 * BLOCK * HEAD_DIM * 4
    assert send.nbytes == recv.nbytes == want
    assert send.blocks == recv.blocks == 4
    assert send.duration_s > 0 and recv.duration_s >= 0
    assert sender.num_active == receiver.num_active == 0


def test_a_failed_transfer_reports_its_kind(
    roles: tuple[KVSender, KVReceiver, list[TransferRecord]],
) -> None:
    _, receiver, records = roles
    receiver.expect(RecvSpec("t2", (5, 6), InstanceRef("pre", ONE), 0, 0.2))
    _wait(lambda: len(records) == 1)
    (r,) = records
    assert (r.role, r.ok, r.nbytes, r.blocks, r.duration_s) == ("recv", False, 0, 0, 0.0)
    assert failure_kind(r.reason) == "timeout"
    assert receiver.num_active == 0


@pytest.mark.parametrize(
    ("reason", "kind"),
    [
        ("timed out after 10s with 3 of 6 layer slices incomplete", "timeout"),
        ("receiver dec/0 refused the transfer", "refused"),
        ("checksum mismatch in layer 1 blocks 0..3 from pre/0", "checksum"),
        ("lost sender pre/0: connection reset", "connection"),
        ("send to dec/0 failed: broken pipe", "connection"),
        ("prefill abandoned", "aborted"),
        ("request aborted", "aborted"),
        ("receiver closed", "shutdown"),
        ("sender pre/0 ended with 2 layer slices incomplete", "protocol"),
        ("something new", "other"),
        (None, "other"),
    ],
)
def test_failure_kinds_are_a_bounded_vocabulary(reason: str | None, kind: str) -> None:
    assert failure_kind(reason) == kind and kind in FAILURE_KINDS
