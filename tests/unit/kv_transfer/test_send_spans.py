"""A traced transfer over the in-process fake: each message is a `kv.message` span whose
context crosses in its header, each layer a `kv.send` span from its queueing to its
message's completion, and each landing a `kv.land` span under the message that brought
it. An untraced transfer records nothing. A failed transfer's log line names its request."""

from __future__ import annotations

import logging
import time

import pytest
import torch

from engine.block_pool import BlockPool
from engine.kv_cache import KVCache
from kv_transfer.base import InstanceRef, LocalRank, Parallelism, RecvSpec, SendSpec
from kv_transfer.fake import FakeFabric
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.sender import KVSender, SenderConfig
from kv_transfer.testing import fill, rank_layout, reference_kv
from telemetry import TraceContext, install_log_records, request_scope, tracing
from telemetry.records import SpanRecord

GEO = KVGeometry(num_layers=3, num_kv_heads=2)
HEAD_DIM, BLOCK, NUM_BLOCKS = 8, 4, 16


def _transfer(trace: TraceContext | None) -> None:
    one = Parallelism()
    pre, dec = LocalRank("p", one, 0, 0), LocalRank("d", one, 0, 0)
    layout = rank_layout(GEO, pre, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32)
    src_cache, dst_cache = KVCache(layout), KVCache(layout)
    pool = BlockPool(NUM_BLOCKS)
    src, dst = pool.allocate(3), pool.allocate(3)
    fill(src_cache, reference_kv(GEO, HEAD_DIM, BLOCK, 3, torch.float32, 0), GEO, pre, src)
    fabric = FakeFabric()
    receiver = KVReceiver(dec, dst_cache, GEO, fabric.endpoint())
    sender = KVSender(pre, src_cache, GEO, fabric.connector(), SenderConfig(max_span_bytes=1))
    try:
        receiver.expect(RecvSpec("x1", tuple(dst), InstanceRef("p", one), 0, 5.0))
        sender.open(SendSpec("x1", InstanceRef("d", one), 0, 5.0, trace))
        for layer in range(GEO.num_layers):
            sender.send_layer("x1", layer, src, 0)
        sender.finish("x1")
        for role in (sender, receiver):
            while not role.poll("x1").terminal:
                pass
        assert receiver.poll("x1").state.value == "done"
    finally:
        sender.close()
        receiver.close()
    assert tracing.flush()


def test_a_traced_transfer_records_its_messages_sends_and_landings(
    spans: list[SpanRecord],
) -> None:
    parent = TraceContext(0xABC, 0x123)
    _transfer(parent)
    by_name: dict[str, list[SpanRecord]] = {}
    for s in spans:
        by_name.setdefault(s.name, []).append(s)
    assert {s.trace_id for s in spans} == {f"{0xABC:032x}"}
    messages = by_name["kv.message"]
    assert sorted(str(m.attributes["message"]) for m in messages) == ["DATA"] * 3 + ["END"]
    assert all(m.parent_id == f"{0x123:016x}" for m in messages)
    sends = sorted(by_name["kv.send"], key=lambda s: int(s.attributes["layer"]))
    assert [s.attributes["layer"] for s in sends] == [0, 1, 2]
    assert all(s.parent_id == f"{0x123:016x}" and s.end_ns >= s.start_ns for s in sends)
    data = {int(m.attributes["layer"]): m for m in messages if m.attributes["message"] == "DATA"}
    lands = by_name["kv.land"]
    assert sorted(int(s.attributes["layer"]) for s in lands) == [0, 1, 2]
    for land in lands:  # under the message that brought the layer: the header's context
        assert land.parent_id == data[int(land.attributes["layer"])].span_id


def test_an_untraced_or_unsampled_transfer_records_nothing(spans: list[SpanRecord]) -> None:
    _transfer(None)
    _transfer(TraceContext(0xABC, 0x123, sampled=False))
    assert spans == []


def test_a_failed_transfer_s_log_line_names_its_request(caplog: pytest.LogCaptureFixture) -> None:
    """The sender keeps the request id bound when the transfer opened (on the engine
    thread) and names it when the transfer fails on its own thread."""
    install_log_records()
    one = Parallelism()
    pre = LocalRank("p", one, 0, 0)
    cache = KVCache(rank_layout(GEO, pre, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32))
    sender = KVSender(pre, cache, GEO, FakeFabric().connector(), SenderConfig(tick_s=0.01))
    caplog.set_level(logging.WARNING, logger="kv_transfer")
    try:
        with request_scope("req-77"):
            sender.open(SendSpec("x2", InstanceRef("d", one), 0, 0.05))
        sender.send_layer("x2", 0, [1], 0)
        deadline = time.monotonic() + 5
        while not sender.poll("x2").terminal and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sender.poll("x2").state.value == "failed"
    finally:
        sender.close()
    lines = [r.getMessage() for r in caplog.records if "x2" in r.getMessage()]
    assert lines and all(line.startswith("[req-77] transfer x2 failed") for line in lines), lines
