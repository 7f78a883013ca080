"""Multi-process transfers over real Gloo pairs and real shared memory.

The decode instance lives in the test process and each prefill instance in a spawned
one (or the other way round when the receiver is the one that dies). Every test ends
with leak checks: no active transfers, every block back in its pool, every shm slot
free, no segment left in /dev/shm, and no rendezvous key left in Redis.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
import torch
from kvt_workers import (
    Decode,
    Prefill,
    Setup,
    Spawn,
    decode_main,
    kv_keys,
    own_segments,
    prefill_main,
)

from kv_transfer.faults import Fault, FaultKind
from kv_transfer.shm import sweep_stale_segments
from kv_transfer.torch_dist import TorchDistEndpoint
from kv_transfer.transport import MIN_SPAN_PART_BYTES

MakeDecode = Callable[[Setup], Decode]

TRANSPORTS = ["torch_dist", "shm"]
DONE = ("done", None)


def _setup(
    redis_url: str, cluster: str, name: str, transport: str, tp: int = 1, pp: int = 1, **kw: object
) -> Setup:
    return Setup(name, tp, pp, transport, redis_url, cluster, **kw)  # type: ignore[arg-type]


def _assert_clean(decode: Decode, redis_url: str, cluster: str) -> None:
    assert decode.leaks() == []
    decode.close()
    assert own_segments() == []
    assert kv_keys(redis_url, cluster) == []


@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize(
    "src,dst,dtype",
    [
        ((1, 1), (2, 1), "float32"),
        ((2, 1), (1, 1), "float32"),
        ((2, 1), (2, 1), "bfloat16"),
        ((1, 2), (1, 1), "float32"),
        ((1, 1), (1, 1), "float32"),
    ],
    ids=["tp1-tp2", "tp2-tp1", "tp2-tp2-bf16", "pp2-pp1", "tp1-tp1-contiguous"],
)
def test_m_to_n_is_bit_exact(
    spawn: Spawn,
    make_decode: MakeDecode,
    redis_url: str,
    cluster_name: str,
    transport: str,
    src: tuple[int, int],
    dst: tuple[int, int],
    dtype: str,
) -> None:
    # TP1 -> TP1 over consecutive block ids, one layer per message and no checksums:
    # torch_dist receives straight into the blocks. Checksummed messages are staged.
    # (An shm receiver takes no message without a checksum.)
    scramble = src != dst or src != (1, 1)
    span_bytes = None if scramble else 1
    pre_setup = _setup(
        redis_url,
        cluster_name,
        "prefill-0",
        transport,
        *src,
        dtype=dtype,
        max_span_bytes=span_bytes,
        checksum=None if scramble or transport == "shm" else False,
    )
    decode = make_decode(
        _setup(redis_url, cluster_name, "decode-0", transport, *dst, dtype=dtype, scramble=scramble)
    )
    prefill = spawn(prefill_main, pre_setup)
    # The second transfer is chunked and reuses the pairs the first one built.
    for tid, num_blocks, seed, chunks in (("t1", 9, 1, []), ("t2", 13, 2, [4, 9])):
        decode.expect(tid, pre_setup.ref, num_blocks, timeout_s=15)
        tag, sent = prefill.call("send", tid, decode.setup.ref, num_blocks, seed, chunks, 15)
        assert tag == "sent" and set(sent["states"]) == {DONE}
        assert {s.state.value for s in decode.wait(tid)} == {"done"}
        assert decode.landed(tid, num_blocks, seed)
        decode.free(tid)
    # Each receiver rank has one pair per sender rank that sends it anything.
    connections = [e.num_connections for e in decode.endpoints]
    assert min(connections) >= 1 and sum(connections) <= src[0] * src[1] * dst[0] * dst[1]
    for e in decode.endpoints:
        if isinstance(e, TorchDistEndpoint):
            assert (e.stats.direct > 0) == (not scramble), (e.stats.direct, e.stats.staged)
    assert prefill.call("close") == ("closed", {"active": [0] * src[0] * src[1], "free": 64})
    _assert_clean(decode, redis_url, cluster_name)


@pytest.mark.parametrize("checksum", [False, True], ids=["unchecked", "checksummed"])
def test_zero_copy_sender_with_direct_receiver(
    spawn: Spawn, make_decode: MakeDecode, redis_url: str, cluster_name: str, checksum: bool
) -> None:
    """Consecutive blocks on both sides: no gather on the sender, no staging on the
    receiver, with or without checksums (summed in place on both sides). finish()
    returns only once the sends are done, so the source stays intact. Blocks of 16 x 4
    heads x 256 dims make even a 5-block chunk's parts big enough to travel one by one
    when layers queue up into a span."""
    big = {"head_dim": 256, "block_size": 16}
    assert MIN_SPAN_PART_BYTES <= 5 * 16 * 4 * 256 * 4
    pre_setup = _setup(
        redis_url,
        cluster_name,
        "prefill-0",
        "torch_dist",
        scramble=False,
        zero_copy=True,
        checksum=checksum,
        **big,
    )
    decode = make_decode(
        _setup(redis_url, cluster_name, "decode-0", "torch_dist", scramble=False, **big)
    )
    prefill = spawn(prefill_main, pre_setup)
    for tid, seed, chunks in (("t1", 1, []), ("t2", 2, [5, 11]), ("t3", 3, [])):
        decode.expect(tid, pre_setup.ref, 16, timeout_s=15)
        tag, sent = prefill.call("send", tid, decode.setup.ref, 16, seed, chunks, 15)
        assert tag == "sent" and set(sent["states"]) == {DONE}
        assert [s.state.value for s in decode.wait(tid)] == ["done"]
        assert decode.landed(tid, 16, seed)
        decode.free(tid)
    (endpoint,) = decode.endpoints
    assert isinstance(endpoint, TorchDistEndpoint)
    stats = (endpoint.stats.direct, endpoint.stats.staged)
    assert endpoint.stats.direct > 0 and endpoint.stats.staged == 0, stats
    assert prefill.call("close")[0] == "closed"
    _assert_clean(decode, redis_url, cluster_name)


# Consecutive destination blocks matter for torch_dist only: it then receives straight
# into them.
@pytest.mark.parametrize(
    "transport,after,scramble",
    [
        ("torch_dist", 0, True),
        ("torch_dist", 2, True),
        ("torch_dist", 2, False),
        ("shm", 0, True),
        ("shm", 2, True),
    ],
    ids=[
        "td-before-any-data",
        "td-mid-transfer",
        "td-mid-direct",
        "shm-before-any-data",
        "shm-mid-transfer",
    ],
)
def test_killed_sender_fails_within_timeout(
    spawn: Spawn,
    make_decode: MakeDecode,
    redis_url: str,
    cluster_name: str,
    transport: str,
    after: int,
    scramble: bool,
) -> None:
    timeout = 3.0
    pre_setup = _setup(
        redis_url,
        cluster_name,
        "prefill-0",
        transport,
        faults=(Fault(FaultKind.KILL, after=after),),
    )
    decode = make_decode(_setup(redis_url, cluster_name, "decode-0", transport, scramble=scramble))
    prefill = spawn(prefill_main, pre_setup)
    decode.expect("t1", pre_setup.ref, 10, timeout_s=timeout)
    began = time.monotonic()
    prefill.send("send", "t1", decode.setup.ref, 10, 1, [], timeout)
    prefill.proc.join(timeout=10)
    assert prefill.proc.exitcode == -signal.SIGKILL
    states = decode.wait("t1", limit=timeout + 5)
    elapsed = time.monotonic() - began
    assert [s.state.value for s in states] == ["failed"]
    assert elapsed <= timeout + 1.0, f"FAILED only after {elapsed:.2f}s"
    if after > 0:  # it had data in flight: the lost connection fails it at once
        assert "lost sender" in (states[0].reason or ""), states[0].reason
    decode.free("t1")
    _assert_clean(decode, redis_url, cluster_name)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_killed_receiver_does_not_hang_the_sender(
    spawn: Spawn, redis_url: str, cluster_name: str, transport: str
) -> None:
    timeout = 3.0
    dec_setup = _setup(redis_url, cluster_name, "decode-0", transport)
    prefill = Prefill(_setup(redis_url, cluster_name, "prefill-0", transport))
    decode = spawn(decode_main, dec_setup)
    assert decode.call("expect", "t1", prefill.setup.ref, 8, timeout) == ("expected",)
    sent = prefill.send("t1", dec_setup.ref, 8, 1, [], timeout)
    assert set(sent["states"]) == {DONE}
    assert decode.call("wait", "t1", 8, 1) == ("waited", [DONE], True)

    assert decode.call("expect", "t2", prefill.setup.ref, 8, timeout) == ("expected",)
    decode.proc.kill()
    decode.proc.join(timeout=5)
    began = time.monotonic()
    sent = prefill.send("t2", dec_setup.ref, 8, 2, [], timeout)
    elapsed = time.monotonic() - began
    assert [state for state, _ in sent["states"]] == ["failed"]
    assert elapsed <= timeout + 1.0, f"sender ended after {elapsed:.2f}s"
    began = time.monotonic()
    assert prefill.close() == {"active": [0], "free": 64}
    assert time.monotonic() - began < 2.0
    if transport == "shm":  # the dead receiver could not unlink its segment
        assert len(sweep_stale_segments()) == 1


# (transport, scattered blocks, checksums): staged into scattered blocks, staged into
# one run (checksummed messages travel whole), and, without checksums, straight into
# one run of blocks, where only a drop can be detected.
# transport, scrambled blocks (both sides), checksum (None: the default), zero-copy
_FAULT_PATHS = {
    "td": ("torch_dist", True, None, False),
    "td-one-run": ("torch_dist", False, None, False),
    "td-direct": ("torch_dist", False, False, False),
    "td-zero-copy": ("torch_dist", False, True, True),
    "shm": ("shm", True, None, False),
}


@pytest.mark.parametrize(
    "kind,path",
    [
        (kind, path)
        for kind in (FaultKind.DROP, FaultKind.CORRUPT)
        for path, (_, _, checksum, _) in _FAULT_PATHS.items()
        if checksum is not False or kind is FaultKind.DROP
    ],
)
def test_drop_or_corruption_fails_then_the_pair_recovers(
    spawn: Spawn,
    make_decode: MakeDecode,
    redis_url: str,
    cluster_name: str,
    kind: FaultKind,
    path: str,
) -> None:
    transport, scramble, checksum, zero_copy = _FAULT_PATHS[path]
    pre_setup = _setup(
        redis_url,
        cluster_name,
        "prefill-0",
        transport,
        faults=(Fault(kind, after=2),),
        checksum=checksum,
        zero_copy=zero_copy,
        scramble=scramble,
    )
    decode = make_decode(_setup(redis_url, cluster_name, "decode-0", transport, scramble=scramble))
    prefill = spawn(prefill_main, pre_setup)
    decode.expect("t1", pre_setup.ref, 6, timeout_s=10)
    prefill.call("send", "t1", decode.setup.ref, 6, 1, [], 10)
    (status,) = decode.wait("t1")
    assert status.state.value == "failed"
    want = "checksum mismatch" if kind is FaultKind.CORRUPT else "incomplete"
    assert want in (status.reason or ""), status.reason
    decode.free("t1")
    decode.expect("t2", pre_setup.ref, 6, timeout_s=10)
    prefill.call("send", "t2", decode.setup.ref, 6, 2, [], 10)
    assert [s.state.value for s in decode.wait("t2")] == ["done"]
    assert decode.landed("t2", 6, 2)
    decode.free("t2")
    if zero_copy:  # checksummed parts landed in place, and were verified there
        (endpoint,) = decode.endpoints
        assert isinstance(endpoint, TorchDistEndpoint)
        assert endpoint.stats.direct > 0 and endpoint.stats.staged == 0
        # t1's last layer, after the fault in layer 2, may arrive once t1 has failed:
        # it is drained, never staged
        assert endpoint.stats.drained <= 1
    assert prefill.call("close")[0] == "closed"
    _assert_clean(decode, redis_url, cluster_name)


_ONE_RUN_UNCHECKED = ("one-run-small-parts", "one-run-zero-copy")


@pytest.mark.parametrize(
    "transport,layout",
    [(t, "scattered") for t in TRANSPORTS]
    + [(t, "one-run") for t in TRANSPORTS]
    + [("torch_dist", layout) for layout in (*_ONE_RUN_UNCHECKED, "one-run-checksummed")],
)
def test_queued_layers_travel_as_one_span(
    spawn: Spawn,
    make_decode: MakeDecode,
    redis_url: str,
    cluster_name: str,
    transport: str,
    layout: str,
) -> None:
    """The first slice is held up, so the other layers queue behind it and go as one
    message: written in place over shm. Over torch_dist a span into scattered blocks
    (or split between TP ranks) is staged and scattered; a span with a checksum is
    staged whole and summed as it is scattered; one without, into one run of blocks
    with all heads, lands straight in them, one part per layer and K/V (and zero-copy,
    it also leaves from the sender's cache as it lies) unless those parts are too small
    to be worth a message each: it is then staged whole."""
    one_run = layout != "scattered"
    zero_copy = layout == "one-run-zero-copy"
    # Landing in place needs messages without checksums; the rest keep the default (on).
    in_place = transport == "torch_dist" and layout in ("one-run", *_ONE_RUN_UNCHECKED)
    checksum = False if in_place else None
    # 11 blocks of 16 x 4 heads x 128 dims: 352 KB parts; the default geometry's: 11 KB
    big = {} if layout == "one-run-small-parts" else {"head_dim": 128, "block_size": 16}
    assert MIN_SPAN_PART_BYTES <= 11 * 16 * 4 * 128 * 4
    delay = Fault(FaultKind.DELAY, delay_s=0.3, times=1)
    pre_setup = _setup(
        redis_url,
        cluster_name,
        "prefill-0",
        transport,
        faults=(delay,),
        spans=True,
        scramble=not zero_copy,
        zero_copy=zero_copy,
        checksum=checksum,
        **big,
    )
    decode = make_decode(
        _setup(
            redis_url,
            cluster_name,
            "decode-0",
            transport,
            tp=1 if one_run else 2,
            scramble=not one_run,
            **big,
        )
    )
    prefill = spawn(prefill_main, pre_setup)
    decode.expect("t1", pre_setup.ref, 11, timeout_s=10)
    tag, sent = prefill.call("send", "t1", decode.setup.ref, 11, 3, [], 10)
    assert tag == "sent" and set(sent["states"]) == {DONE}
    assert {s.state.value for s in decode.wait("t1")} == {"done"}
    assert decode.landed("t1", 11, 3)
    decode.free("t1")
    for e in decode.endpoints:
        if not isinstance(e, TorchDistEndpoint):
            continue
        # Layers 1-3 as a span (layer 0 alone before it, or in it) to each receiver rank.
        stats = (e.stats.spans, e.stats.direct, e.stats.staged)
        assert e.stats.spans == 1 and e.stats.direct + e.stats.staged in (1, 2), stats
        if layout in ("scattered", "one-run-checksummed"):
            assert e.stats.direct == 0, stats
        elif layout == "one-run-small-parts":  # a lone layer 0 lands directly
            assert e.stats.staged == 1, stats
        else:
            assert e.stats.staged == 0, stats
    assert prefill.call("close")[0] == "closed"
    _assert_clean(decode, redis_url, cluster_name)


@pytest.mark.parametrize("transport", TRANSPORTS)
def test_two_senders_into_one_receiver_at_once(
    spawn: Spawn, make_decode: MakeDecode, redis_url: str, cluster_name: str, transport: str
) -> None:
    decode = make_decode(
        _setup(redis_url, cluster_name, "decode-0", transport, tp=2, num_blocks=96)
    )
    a = _setup(redis_url, cluster_name, "prefill-a", transport, 1, 1)
    b = _setup(redis_url, cluster_name, "prefill-b", transport, 2, 1)
    children = {"ta": spawn(prefill_main, a), "tb": spawn(prefill_main, b)}
    decode.expect("ta", a.ref, 40, timeout_s=20)
    decode.expect("tb", b.ref, 40, timeout_s=20)
    for i, (tid, child) in enumerate(children.items()):
        child.send("send", tid, decode.setup.ref, 40, 10 + i, [10, 20, 30], 20)
    for child in children.values():
        _tag, sent = child.reply()
        assert set(sent["states"]) == {DONE}
    for i, tid in enumerate(children):
        assert {s.state.value for s in decode.wait(tid)} == {"done"}
        assert decode.landed(tid, 40, 10 + i)
        decode.free(tid)
    for child in children.values():
        assert child.call("close")[0] == "closed"
    _assert_clean(decode, redis_url, cluster_name)


def test_hung_receiver_does_not_hang_the_sender(
    spawn: Spawn, redis_url: str, cluster_name: str
) -> None:
    """A receiver that stops answering (SIGSTOP) rather than dying: the sender's deadline
    fails the transfer, the pair is torn down, and closing the sender stays quick."""
    timeout = 2.0
    dec_setup = _setup(
        redis_url, cluster_name, "decode-0", "torch_dist", num_blocks=256, op_timeout_s=30.0
    )
    prefill = Prefill(
        _setup(
            redis_url, cluster_name, "prefill-0", "torch_dist", num_blocks=256, op_timeout_s=30.0
        )
    )
    decode = spawn(decode_main, dec_setup)
    try:
        assert decode.call("expect", "t1", prefill.setup.ref, 8, timeout) == ("expected",)
        assert set(prefill.send("t1", dec_setup.ref, 8, 1, [], timeout)["states"]) == {DONE}
        assert decode.call("expect", "t2", prefill.setup.ref, 200, 30.0) == ("expected",)
        os.kill(decode.proc.pid, signal.SIGSTOP)
        began = time.monotonic()
        sent = prefill.send("t2", dec_setup.ref, 200, 2, [], timeout)
        elapsed = time.monotonic() - began
        assert [state for state, _ in sent["states"]] == ["failed"]
        assert "timed out" in (sent["states"][0][1] or "")
        assert elapsed <= timeout + 1.0, f"sender ended after {elapsed:.2f}s"
        began = time.monotonic()
        assert prefill.close() == {"active": [0], "free": 256}
        assert time.monotonic() - began < 2.0
    finally:
        os.kill(decode.proc.pid, signal.SIGKILL)


@pytest.mark.gpu
@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="NCCL pairs need two GPUs (one per process)",
)
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_nccl_tp2_to_tp1_is_bit_exact(
    spawn: Spawn, make_decode: MakeDecode, redis_url: str, cluster_name: str, dtype: str
) -> None:
    pre_setup = _setup(
        redis_url, cluster_name, "prefill-0", "torch_dist", 2, 1, dtype=dtype, device="cuda:0"
    )
    decode = make_decode(
        _setup(redis_url, cluster_name, "decode-0", "torch_dist", dtype=dtype, device="cuda:1")
    )
    prefill = spawn(prefill_main, pre_setup)
    for tid, seed, chunks in (("t1", 1, []), ("t2", 2, [3, 7])):
        decode.expect(tid, pre_setup.ref, 11, timeout_s=30)
        tag, sent = prefill.call("send", tid, decode.setup.ref, 11, seed, chunks, 30)
        assert tag == "sent" and set(sent["states"]) == {DONE}
        assert {s.state.value for s in decode.wait(tid)} == {"done"}
        assert decode.landed(tid, 11, seed)
        decode.free(tid)
    assert prefill.call("close")[0] == "closed"
    _assert_clean(decode, redis_url, cluster_name)
