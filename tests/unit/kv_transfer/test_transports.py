"""The real transports in one process: real Gloo pairs, real shared memory, real sockets.

The multi-process behaviour (dead peers, M:N layouts) is in tests/integration; these
pin down what one process can show quickly: revocation, a malformed peer, a missing
receiver, and that every resource is released.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch

from engine.kv_cache import KVCache
from kv_transfer.auth import HelloAuth
from kv_transfer.base import LocalRank, RecvSpec, SendSpec, TransferState, TransferStatus
from kv_transfer.header import Header, Hello, MessageKind
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import MemoryRendezvous
from kv_transfer.sender import KVSender, SenderConfig
from kv_transfer.shm import ShmConfig, ShmConnector, ShmEndpoint, ShmSegment
from kv_transfer.testing import fill, rank_layout, read, reference_kv, shard
from kv_transfer.torch_dist import TorchDistConfig, TorchDistConnector, TorchDistEndpoint
from kv_transfer.transport import Connector

GEO = KVGeometry(4, 2)
HEAD_DIM, BLOCK, NUM_BLOCKS = 16, 4, 32
PRE, DEC = LocalRank("prefill-0"), LocalRank("decode-0")
SRC, DST = [3, 4, 5, 9, 1], [7, 8, 20, 21, 22]
SECRET = os.urandom(32)  # the cluster secret every pair here seals its HELLOs with


@dataclass
class Pair:
    store: MemoryRendezvous
    sender: KVSender
    receiver: KVReceiver
    src: KVCache
    dst: KVCache
    segment: ShmSegment | None
    connector: Callable[[bytes | None], Connector]  # another sender's, with this secret


@pytest.fixture(params=["torch_dist", "torch_dist-gather", "shm"])
def pair(request: pytest.FixtureRequest) -> Iterator[Pair]:
    store = MemoryRendezvous()
    src = KVCache(rank_layout(GEO, PRE, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32))
    layout = rank_layout(GEO, DEC, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32)
    segment = None
    connector: Callable[[bytes | None], Connector]
    if request.param == "shm":
        segment = ShmSegment.create(layout)
        dst = KVCache(layout, storage=segment.cache_bytes)
        shm = ShmConfig(secret=SECRET)
        receiver = KVReceiver(DEC, dst, GEO, ShmEndpoint(store, segment, GEO, shm))

        def connector(secret: bytes | None) -> Connector:
            return ShmConnector(store, replace(shm, secret=secret))

    else:
        dst = KVCache(layout)
        # the default sends straight from the cache (zero-copy) over Gloo
        zero_copy = False if request.param.endswith("gather") else None
        cfg = TorchDistConfig(
            op_timeout_s=3.0, connect_timeout_s=3.0, zero_copy=zero_copy, secret=SECRET
        )
        receiver = KVReceiver(DEC, dst, GEO, TorchDistEndpoint(store, cfg))

        def connector(secret: bytes | None) -> Connector:
            return TorchDistConnector(store, replace(cfg, secret=secret))

    sender = KVSender(PRE, src, GEO, connector(SECRET))
    yield Pair(store, sender, receiver, src, dst, segment, connector)
    sender.close()
    receiver.close()
    assert store.keys() == []  # the lease was withdrawn
    if segment is not None:
        segment.close()
        assert not segment.path.exists()


def _wait(role: KVSender | KVReceiver, tid: str, limit: float = 5.0) -> TransferStatus:
    deadline = time.monotonic() + limit
    while not role.poll(tid).terminal and time.monotonic() < deadline:
        time.sleep(0.001)
    return role.poll(tid)


def _no_leaks(p: Pair) -> None:
    assert p.sender.num_active == 0 and p.receiver.num_active == 0
    endpoint = p.receiver.endpoint
    if isinstance(endpoint, ShmEndpoint):
        assert endpoint.num_free_slots == endpoint.num_slots


def test_transfers_land_bit_exact_over_one_reused_pair(pair: Pair) -> None:
    for i in range(3):
        ref = reference_kv(GEO, HEAD_DIM, BLOCK, len(SRC), torch.float32, seed=i)
        fill(pair.src, ref, GEO, PRE, SRC)
        tid = f"t{i}"
        pair.receiver.expect(RecvSpec(tid, tuple(DST), PRE.ref))
        pair.sender.open(SendSpec(tid, DEC.ref))
        for layer in range(GEO.num_layers):
            pair.sender.send_layer(tid, layer, SRC[:2], 0)
        for layer in range(GEO.num_layers):
            pair.sender.send_layer(tid, layer, SRC[2:], 2)
        pair.sender.finish(tid)
        assert _wait(pair.receiver, tid).state is TransferState.DONE
        assert _wait(pair.sender, tid).state is TransferState.DONE
        assert torch.equal(read(pair.dst, DST), shard(ref, GEO, DEC))
    assert pair.receiver.endpoint.num_connections == 1  # type: ignore[attr-defined]
    _no_leaks(pair)


def test_nothing_lands_after_the_receiver_aborts(pair: Pair) -> None:
    ref = reference_kv(GEO, HEAD_DIM, BLOCK, len(SRC), torch.float32)
    fill(pair.src, ref, GEO, PRE, SRC)
    pair.receiver.expect(RecvSpec("t", tuple(DST), PRE.ref))
    pair.sender.open(SendSpec("t", DEC.ref))
    pair.sender.send_layer("t", 0, SRC, 0)
    deadline = time.monotonic() + 5
    while pair.receiver.poll("t").state is TransferState.PENDING and time.monotonic() < deadline:
        time.sleep(0.001)
    pair.receiver.abort("t")
    assert pair.receiver.poll("t").state is TransferState.FAILED
    before = pair.dst.tensor.clone()
    for layer in range(1, GEO.num_layers):
        pair.sender.send_layer("t", layer, SRC, 0)
    pair.sender.finish("t")
    status = _wait(pair.sender, "t")
    if pair.segment is not None:  # the shm sender finds the slot revoked and writes nothing
        assert status.state is TransferState.FAILED and "not open" in (status.reason or "")
    assert torch.equal(pair.dst.tensor, before)
    _no_leaks(pair)


def test_a_malformed_peer_is_dropped(pair: Pair) -> None:
    """Garbage on a control connection ends it; transfers it fed fail, others go on."""
    pair.receiver.expect(RecvSpec("t", tuple(DST), PRE.ref))
    record = pair.store.lookup(
        f"{'shm' if pair.segment is not None else 'torch_dist'}:{DEC.instance}:0"
    )
    assert record is not None
    ctl = json.loads(record)["control"]
    if ctl.startswith("unix:@"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect("\0" + ctl[len("unix:@") :])
    else:
        host, _, port = ctl[len("tcp://") :].rpartition(":")
        sock = socket.create_connection((host, int(port)), timeout=5)
    with sock:
        hello = Hello("prefill-0", 0, 1, 1, os.urandom(16)).pack()
        sock.sendall(hello + HelloAuth(SECRET).seal(ctl, hello))  # a peer of this cluster
        bad = bytearray(Header(MessageKind.END, "t", 0).pack())
        bad[-1] ^= 0xFF  # CRC mismatch
        sock.sendall(bytes(bad))
        sock.settimeout(5)
        # The receiver hangs up on us (torch_dist: once the pair rendezvous times out).
        with contextlib.suppress(ConnectionResetError):
            assert sock.recv(1) == b""
    assert pair.receiver.poll("t").state is TransferState.PENDING  # it fed nothing
    pair.receiver.abort("t")
    _no_leaks(pair)


def _refusals(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if "refused a control connection" in r.getMessage()]


@pytest.mark.parametrize("secret", [None, b"another cluster's secret"], ids=["none", "foreign"])
def test_a_sender_without_the_cluster_secret_is_refused(
    pair: Pair, secret: bytes | None, caplog: pytest.LogCaptureFixture
) -> None:
    """A sender whose HELLO is unsealed or sealed with another secret never gets a
    session: nothing it sends counts at the receiver, and the refusal is one warning.
    (Over shm the segment file is the user's own, so a process of the same user could
    write into it anyway; what the seal keeps out is its word that the data is there.)"""
    ref = reference_kv(GEO, HEAD_DIM, BLOCK, len(SRC), torch.float32)
    fill(pair.src, ref, GEO, PRE, SRC)
    before = pair.dst.tensor.clone()
    stranger = KVSender(PRE, pair.src, GEO, pair.connector(secret))
    pair.receiver.expect(RecvSpec("t", tuple(DST), PRE.ref, timeout_s=8))
    with caplog.at_level(logging.WARNING, logger="kv_transfer.control"):
        stranger.open(SendSpec("t", DEC.ref, timeout_s=8))
        for layer in range(GEO.num_layers):
            stranger.send_layer("t", layer, SRC, 0)
        stranger.finish("t")
        sent = _wait(stranger, "t", limit=10).state
        deadline = time.monotonic() + 10  # an unsealed HELLO is refused at the handshake timeout
        while not _refusals(caplog) and time.monotonic() < deadline:
            time.sleep(0.01)
    # Over shm a send is done once written (or failed, once the refusal closed the
    # socket); the receiver never takes the stranger's word either way.
    assert sent is TransferState.FAILED or pair.segment is not None
    assert pair.receiver.poll("t").state is TransferState.PENDING
    refused = _refusals(caplog)
    assert refused and refused[0].levelno == logging.WARNING
    if pair.segment is None:  # over shm the stranger wrote before its header was refused
        assert torch.equal(pair.dst.tensor, before)
    pair.receiver.abort("t")
    assert pair.receiver.endpoint.num_connections == 0  # type: ignore[attr-defined]
    stranger.close()
    _no_leaks(pair)


def test_shm_refuses_data_without_a_checksum() -> None:
    """What a sender writes into the receiver's memory is always verified: a DATA
    message that carries no checksum ends the connection and fails the transfer."""
    store = MemoryRendezvous()
    src = KVCache(rank_layout(GEO, PRE, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32))
    layout = rank_layout(GEO, DEC, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32)
    segment = ShmSegment.create(layout)
    dst = KVCache(layout, storage=segment.cache_bytes)
    receiver = KVReceiver(DEC, dst, GEO, ShmEndpoint(store, segment, GEO))
    sender = KVSender(PRE, src, GEO, ShmConnector(store), SenderConfig(checksum=False))
    try:
        receiver.expect(RecvSpec("t", tuple(DST), PRE.ref))
        sender.open(SendSpec("t", DEC.ref))
        for layer in range(GEO.num_layers):
            sender.send_layer("t", layer, SRC, 0)
        sender.finish("t")
        status = _wait(receiver, "t")
        assert status.state is TransferState.FAILED
        assert "without a checksum" in (status.reason or ""), status.reason
    finally:
        sender.close()
        receiver.close()
        segment.close()


def test_a_missing_receiver_fails_the_sender_at_once(pair: Pair) -> None:
    pair.sender.open(SendSpec("t", LocalRank("nobody").ref, timeout_s=30))
    pair.sender.send_layer("t", 0, SRC, 0)
    began = time.monotonic()
    status = _wait(pair.sender, "t")
    assert status.state is TransferState.FAILED and "no " in (status.reason or "")
    assert time.monotonic() - began < 2.0
    pair.sender.finish("t")  # a no-op on a failed transfer
    _no_leaks(pair)


def test_segments_of_dead_processes_are_swept(tmp_path: Path) -> None:
    from kv_transfer.shm import sweep_stale_segments

    dead = tmp_path / "pdkv-999999999-0123456789abcdef"
    alive = tmp_path / f"pdkv-{os.getpid()}-0123456789abcdef"
    other = tmp_path / "pdkv-999999999-not-ours"
    for path in (dead, alive, other):
        path.write_bytes(b"x")
    assert sweep_stale_segments(tmp_path) == [dead]
    assert alive.exists() and other.exists()


def test_senders_find_each_open_slot_from_its_home_past_collisions() -> None:
    layout = rank_layout(GEO, DEC, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32)
    segment = ShmSegment.create(layout, max_slots=4)
    endpoint = ShmEndpoint(MemoryRendezvous(), segment, GEO)
    try:
        # Three ids with one home slot, and one with another: they take slots in turn.
        home = next(segment.probe("a"))
        ids = [t for t in (f"t{i}" for i in range(200)) if next(segment.probe(t)) == home]
        other = next(t for t in (f"u{i}" for i in range(200)) if next(segment.probe(t)) != home)
        specs = [
            RecvSpec(tid, (10 + i, 20 + i, 30 + i), PRE.ref, first_block=i)
            for i, tid in enumerate([*ids[:3], other])
        ]
        for spec in specs:
            endpoint.expect(spec)
        assert endpoint.num_free_slots == 0
        for spec in specs:
            found = segment.find_open(spec.transfer_id)
            assert found is not None
            assert (found.first_block, found.block_count) == (spec.first_block, 3)
            assert segment.block_ids(found, 1, 2) == spec.block_ids[1:]
        assert segment.find_open(ids[3]) is None  # a colliding id that was never opened
        endpoint.revoke(ids[0])  # frees the home slot; the others stay where they are
        assert segment.find_open(ids[0]) is None
        for spec in specs[1:]:
            assert segment.find_open(spec.transfer_id) is not None
        endpoint.expect(RecvSpec(ids[3], (5,), PRE.ref))
        found = segment.find_open(ids[3])
        assert found is not None and found.slot == home
        for spec in specs[1:]:
            endpoint.revoke(spec.transfer_id)
        endpoint.revoke(ids[3])
        assert endpoint.num_free_slots == 4
        assert all(segment.find_open(spec.transfer_id) is None for spec in specs)
    finally:
        endpoint.close()
        segment.close()
