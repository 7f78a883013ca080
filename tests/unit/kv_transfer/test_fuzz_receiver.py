"""Fuzzing a real KV receiver (shared-memory transport, its control server on a Unix
socket) with what a peer can put on the control channel: HELLOs sealed, unsealed,
sealed with another secret, sealed over odd fields, or mutated; then DATA/END/ABORT
headers built from generated fields (the header's fixed layout), valid headers with
flipped bytes, and raw or cut messages, aimed at a transfer the receiver expects.

Every case is refused or handled: the connection ends, the transfer is still pending or
failed (never landed from a forged message), and once it is aborted no slot, session,
connection, thread or file descriptor is left. After the cases, a real sender's
transfer through the same receiver lands bit for bit. Generation is derandomized (a
fixed seed, no example database)."""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine.kv_cache import KVCache
from kv_transfer.auth import HelloAuth
from kv_transfer.base import FirstToken, LocalRank, RecvSpec, SendSpec, TransferState
from kv_transfer.header import MESSAGE_SIZE, Header, Hello, MessageKind
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import MemoryRendezvous
from kv_transfer.sender import KVSender
from kv_transfer.shm import ShmConfig, ShmConnector, ShmEndpoint, ShmSegment
from kv_transfer.testing import fill, rank_layout, read, reference_kv, shard

CASES = 400
GEO = KVGeometry(4, 2)
HEAD_DIM, BLOCK, NUM_BLOCKS = 16, 4, 32
PRE, DEC = LocalRank("prefill-0"), LocalRank("decode-0")
SRC, DST = [3, 4, 5, 9, 1], [7, 8, 20, 21, 22]
SECRET = os.urandom(32)
WAIT_S = 5.0


@dataclass
class Receiver:
    receiver: KVReceiver
    endpoint: ShmEndpoint
    segment: ShmSegment
    cache: KVCache
    store: MemoryRendezvous
    address: str  # the control socket, unix:@name


@pytest.fixture(scope="module")
def target() -> Iterator[Receiver]:
    store = MemoryRendezvous()
    layout = rank_layout(GEO, DEC, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32)
    segment = ShmSegment.create(layout)
    endpoint = ShmEndpoint(store, segment, GEO, ShmConfig(secret=SECRET))
    cache = KVCache(layout, storage=segment.cache_bytes)
    receiver = KVReceiver(DEC, cache, GEO, endpoint)
    record = store.lookup(f"shm:{DEC.instance}:0")
    assert record is not None
    yield Receiver(receiver, endpoint, segment, cache, store, json.loads(record)["control"])
    receiver.close()
    assert store.keys() == []
    segment.close()


def _until(cond: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + WAIT_S
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


# -- what a peer sends ------------------------------------------------------------------

_U32 = st.integers(0, 2**32 - 1)
_small = st.integers(0, 40) | _U32
_dtypes = st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.uint8])
_first = st.none() | st.builds(
    FirstToken,
    token_id=_small,
    draws=_small,
    logprob=st.none() | st.floats(-50, 0),
    top=st.lists(st.tuples(_small, st.floats(-50, 0)), max_size=3).map(tuple),
)


@st.composite
def headers(draw: st.DrawFn, seq: int, tid: str) -> Header:
    kind = draw(st.sampled_from([MessageKind.DATA, MessageKind.DATA, MessageKind.END]))
    kind = draw(st.just(kind) | st.just(MessageKind.ABORT))
    return Header(
        kind=kind,
        transfer_id=draw(st.sampled_from([tid, tid, tid, "other"]) | st.text(max_size=70)),
        src_rank=draw(st.integers(0, 2) | _U32),
        seq=draw(st.sampled_from([seq, seq, seq, seq + 1]) | _U32),
        layer=draw(st.integers(0, 5) | _U32),
        head_start=draw(st.integers(0, 3) | _U32),
        head_count=draw(st.integers(0, 3) | _U32),
        block_start=draw(st.integers(0, 8) | _U32),
        block_count=draw(st.integers(0, 8) | _U32),
        dtype=draw(_dtypes),
        shape=tuple(draw(st.lists(st.integers(0, 64), max_size=6))),
        nbytes=draw(st.integers(0, 1 << 16) | st.integers(0, 2**64 - 1)),
        checksum=draw(st.none() | _U32),
        layer_count=draw(st.integers(1, 4) | _U32),
        parts=draw(st.booleans()),
        first=draw(_first) if kind is MessageKind.END else None,
    )


def _flip(data: bytes, at: list[int]) -> bytes:
    out = bytearray(data)
    for i in at:
        out[i % len(out)] ^= 0xFF
    return bytes(out)


def _packed(header: Header) -> bytes:
    try:
        return header.pack()
    except (ValueError, struct.error, OverflowError):  # not encodable: the raw fields
        return struct.pack("<4I", header.layer, header.block_start, header.seq, 0).ljust(
            MESSAGE_SIZE, b"\x00"
        )


@st.composite
def messages(draw: st.DrawFn, tid: str) -> list[bytes]:
    out = []
    for seq in range(draw(st.integers(0, 5))):
        how = draw(st.sampled_from(["header", "header", "flipped", "raw", "cut"]))
        if how == "raw":
            out.append(draw(st.binary(min_size=MESSAGE_SIZE, max_size=MESSAGE_SIZE)))
            continue
        packed = _packed(draw(headers(seq, tid)))
        if how == "flipped":
            packed = _flip(packed, draw(st.lists(st.integers(0, MESSAGE_SIZE - 1), min_size=1)))
        elif how == "cut":
            packed = packed[: draw(st.integers(0, MESSAGE_SIZE - 1))]
        out.append(packed)
    return out


@st.composite
def hellos(draw: st.DrawFn, address: str) -> tuple[str, bytes]:
    how = draw(st.sampled_from(["sealed", "sealed", "odd", "unsealed", "foreign", "flipped"]))
    hello = Hello("prefill-0", 0, 1, 1, os.urandom(16))
    if how == "odd":  # sealed, so the fields themselves are what is tried
        name = draw(st.text(max_size=20).filter(lambda s: len(s.encode()) <= 64))
        hello = Hello(name, draw(_small), draw(_small), draw(_small), os.urandom(16))
    packed = hello.pack()
    if how == "unsealed":
        return how, packed
    secret = b"another cluster's secret" if how == "foreign" else SECRET
    sealed = packed + HelloAuth(secret).seal(address, packed)
    if how == "flipped":
        at = draw(st.lists(st.integers(0, len(sealed) - 1), min_size=1, max_size=4))
        return how, _flip(sealed, at)
    return how, sealed


# -- the cases --------------------------------------------------------------------------


def _connect(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX)
    sock.settimeout(WAIT_S)
    sock.connect("\0" + address[len("unix:@") :])
    return sock


def _play(t: Receiver, tid: str, hello: bytes, msgs: list[bytes]) -> TransferState:
    """One peer: connect, say its piece, hang up; the transfer's state once the
    receiver has let the connection go, then the transfer is aborted."""
    t.receiver.expect(RecvSpec(tid, tuple(DST), PRE.ref, timeout_s=30))
    try:
        # (the receiver may have refused it before all was sent)
        with (
            _connect(t.address) as sock,
            contextlib.suppress(BrokenPipeError, ConnectionResetError),
        ):
            sock.sendall(hello + b"".join(msgs))
        assert _until(lambda: t.endpoint.num_connections == 0), "a connection stays open"
        state = t.receiver.poll(tid).state
    finally:
        t.receiver.abort(tid)
    assert state is not TransferState.DONE  # nothing forged lands
    assert t.receiver.num_active == 0
    assert t.endpoint.num_free_slots == t.endpoint.num_slots
    return state


def _fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _transfer_lands(t: Receiver, tid: str, seed: int) -> None:
    layout = rank_layout(GEO, PRE, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32)
    src = KVCache(layout)
    ref = reference_kv(GEO, HEAD_DIM, BLOCK, len(SRC), torch.float32, seed=seed)
    fill(src, ref, GEO, PRE, SRC)
    sender = KVSender(PRE, src, GEO, ShmConnector(t.store, ShmConfig(secret=SECRET)))
    try:
        t.receiver.expect(RecvSpec(tid, tuple(DST), PRE.ref))
        sender.open(SendSpec(tid, DEC.ref))
        for layer in range(GEO.num_layers):
            sender.send_layer(tid, layer, SRC, 0)
        sender.finish(tid)
        assert _until(lambda: t.receiver.poll(tid).terminal)
        assert t.receiver.poll(tid).state is TransferState.DONE, t.receiver.poll(tid)
        assert torch.equal(read(t.cache, DST), shard(ref, GEO, DEC))
    finally:
        sender.close()
    assert _until(lambda: t.receiver.num_active == 0)


def test_generated_control_messages_are_refused_or_handled(
    target: Receiver, fuzz_figures: list[str]
) -> None:
    _transfer_lands(target, "before", seed=1)  # threads and fds of a used receiver
    assert _until(lambda: target.endpoint.num_connections == 0)
    threads, fds = threading.active_count(), _fds()
    outcomes: Counter[str] = Counter()
    ids = itertools.count()
    started, cpu = time.monotonic(), time.process_time()

    @settings(
        max_examples=CASES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(data=st.data())
    def case(data: st.DataObject) -> None:
        tid = f"fuzzed-{next(ids)}"
        how, hello = data.draw(hellos(target.address))
        state = _play(target, tid, hello, data.draw(messages(tid)))
        outcomes[f"{how} HELLO, transfer {state.value}"] += 1

    case()
    took, cpu = time.monotonic() - started, time.process_time() - cpu
    assert _until(lambda: threading.active_count() <= threads), threading.enumerate()
    assert _until(lambda: _fds() <= fds), (_fds(), fds)
    _transfer_lands(target, "after", seed=2)
    total = sum(outcomes.values())
    fuzz_figures.append(
        f"KV control channel (shm receiver): {total} cases, 0 failures, {took:.1f} s wall, "
        f"{cpu:.1f} s CPU"
    )
    fuzz_figures.extend(f"  {k}: {v}" for k, v in sorted(outcomes.items()))
    assert total >= CASES
