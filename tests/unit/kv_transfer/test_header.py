"""The fixed-layout header: round trips, and every malformed message is rejected."""

from __future__ import annotations

import struct
import zlib

import pytest
import torch

from kv_transfer.base import MAX_TOP_LOGPROBS, FirstToken, ProtocolError
from kv_transfer.header import MESSAGE_SIZE, Header, Hello, MessageKind, decode
from kv_transfer.transport import staging_for
from telemetry import TraceContext


def _data(**kw: object) -> Header:
    fields: dict[str, object] = dict(
        kind=MessageKind.DATA,
        transfer_id="req-1/xfer",
        src_rank=3,
        seq=7,
        layer=29,
        head_start=2,
        head_count=1,
        block_start=5,
        block_count=64,
        dtype=torch.bfloat16,
        shape=(2, 64, 16, 1, 64),
        nbytes=2 * 64 * 16 * 64 * 2,
        checksum=(1 << 64) - 3,
    )
    fields.update(kw)
    return Header(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "msg",
    [
        _data(),
        _data(checksum=None, dtype=torch.float32),
        _data(checksum=0),
        _data(layer=4, layer_count=26, shape=(26, 2, 64, 16, 1, 64)),
        _data(parts=True),
        _data(checksum=None, layer_count=2, shape=(2, 2, 64, 16, 1, 64), parts=True),
        Header(MessageKind.END, "t" * 64, 0, seq=1),
        Header(MessageKind.END, "t", 0, seq=2, first=FirstToken(49151, 1, sampled_wall=1.7e9)),
        Header(MessageKind.END, "t", 0, first=FirstToken(7, 0, -0.5, ((7, -0.5), (3, -1.25)))),
        Header(MessageKind.END, "t", 0, first=FirstToken(0, 0, 0.0)),
        Header(MessageKind.ABORT, "é-id", 1),
        Hello("prefill-0", 3, 2, 2, bytes(range(16))),
    ],
)
def test_round_trip(msg: Header | Hello) -> None:
    buf = msg.pack()
    assert len(buf) == MESSAGE_SIZE
    assert decode(buf) == msg


def test_checksum_none_and_zero_differ() -> None:
    assert decode(_data(checksum=None).pack()) != decode(_data(checksum=0).pack())


def test_stamped_copies_equal_headers_built_whole() -> None:
    header = _data()
    assert header.with_seq(99) == _data(seq=99)
    assert header.in_parts(True) == _data(parts=True)
    stamped = header.with_checksum(7).with_seq(3)
    assert stamped == _data(checksum=7, seq=3) and hash(stamped) == hash(_data(checksum=7, seq=3))
    assert header == _data()  # the original is untouched
    assert decode(stamped.pack()) == stamped
    with pytest.raises(TypeError, match="unknown header fields"):
        header._with(sequence=1)


def test_unknown_flags_are_rejected() -> None:
    """A flag this version does not know could change how the payload moves."""
    body = bytearray(_data().pack()[:-4])
    body[7] |= 0x80  # flags: magic (4), version, kind, dtype, then flags
    buf = bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))
    with pytest.raises(ProtocolError, match="flags"):
        decode(buf)


@pytest.mark.parametrize("offset", [0, 5, 6, 10, 80, MESSAGE_SIZE - 1])
def test_any_flipped_byte_is_rejected(offset: int) -> None:
    buf = bytearray(_data().pack())
    buf[offset] ^= 0x40
    with pytest.raises(ProtocolError):
        decode(bytes(buf))


def test_wrong_size_is_rejected() -> None:
    with pytest.raises(ProtocolError):
        decode(_data().pack()[:-1])


def test_unencodable_values_are_refused() -> None:
    with pytest.raises(ValueError):
        _data(dtype=torch.complex64).pack()
    with pytest.raises(ValueError):
        _data(shape=(1,) * 7).pack()
    with pytest.raises(ValueError):
        Hello("x", 0, 1, 1, b"short").pack()


def test_a_layer_span_names_its_layers_and_a_zero_count_is_rejected() -> None:
    span = _data(layer=4, layer_count=3)
    assert span.layers == range(4, 7) and _data().layers == range(29, 30)
    buf = bytearray(_data(layer_count=0).pack())
    with pytest.raises(ProtocolError, match="layer count"):
        decode(bytes(buf))


def _payload(shape: tuple[int, ...], layer_count: int = 1, extra: int = 0) -> Header:
    """A float32 DATA header for `shape` (`extra` bytes more than the shape holds)."""
    nbytes = 4 * int(torch.tensor(shape).prod()) + extra
    return _data(dtype=torch.float32, shape=shape, nbytes=nbytes, layer_count=layer_count)


def test_staging_is_bounded_per_layer_and_in_layers() -> None:
    cpu = torch.device("cpu")
    layer = (2, 3, 4, 2, 8)  # one layer's [2, n, slot, head, dim]
    per_layer = 4 * 2 * 3 * 4 * 2 * 8
    assert staging_for(_payload(layer), per_layer, 4, cpu).shape == layer
    span = staging_for(_payload((3, *layer), layer_count=3), per_layer, 4, cpu)
    assert span.shape == (3, *layer)
    with pytest.raises(ProtocolError, match="limit"):  # a layer larger than the cache's
        staging_for(_payload(layer), per_layer - 1, 4, cpu)
    with pytest.raises(ProtocolError, match="5 layers in one message"):
        staging_for(_payload((5, *layer), layer_count=5), per_layer, 4, cpu)
    with pytest.raises(ProtocolError, match="for 3 layers"):  # shape and count disagree
        staging_for(_payload((2, *layer), layer_count=3), per_layer, 4, cpu)
    with pytest.raises(ProtocolError, match="not a DATA header"):  # a span needs 6 dims
        staging_for(_payload(layer, layer_count=2), per_layer, 4, cpu)
    with pytest.raises(ProtocolError, match="payload of"):  # bytes and shape disagree
        staging_for(_payload(layer, extra=4), per_layer * 2, 4, cpu)


def test_first_token_block_is_fixed_size_and_only_on_end() -> None:
    top = tuple((i, -float(i)) for i in range(MAX_TOP_LOGPROBS))
    first = FirstToken(12, 3, -0.25, top, 1234.5)
    got = decode(Header(MessageKind.END, "x", 1, first=first).pack())
    assert isinstance(got, Header) and got.first == first
    assert len(Header(MessageKind.END, "x", 1).pack()) == MESSAGE_SIZE
    with pytest.raises(ValueError, match="only END"):
        _data(first=first).pack()
    with pytest.raises(ValueError, match="at most"):
        FirstToken(1, top=(*top, (1, 0.0)))
    with pytest.raises(ValueError, match=">= 0"):
        FirstToken(-1)


def test_a_first_token_on_data_or_too_many_top_logprobs_is_rejected() -> None:
    def restamp(buf: bytes, at: int, value: bytes) -> bytes:
        body = bytearray(buf[:-4])
        body[at : at + len(value)] = value
        return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))

    flags_at = 7
    with pytest.raises(ProtocolError, match="first token"):
        decode(restamp(_data().pack(), flags_at, bytes([_data().pack()[flags_at] | 4])))
    end = Header(MessageKind.END, "x", 1, first=FirstToken(5)).pack()
    n_top_at = struct.calcsize("<4sBBBB64s9I6IQQ2I")
    with pytest.raises(ProtocolError, match="top logprobs"):
        decode(restamp(end, n_top_at, struct.pack("<I", MAX_TOP_LOGPROBS + 1)))


def _restamp(buf: bytes, at: int, value: bytes) -> bytes:
    body = bytearray(buf[:-4])
    body[at : at + len(value)] = value
    return bytes(body) + struct.pack("<I", zlib.crc32(bytes(body)))


@pytest.mark.parametrize(
    "trace",
    [
        TraceContext(0x4BF92F3577B34DA6A3CE929D0E0E4736, 0x00F067AA0BA902B7),
        TraceContext((1 << 128) - 1, (1 << 64) - 1, sampled=False),
        TraceContext(1, 1),
    ],
)
def test_a_trace_context_round_trips_on_data_and_end(trace: TraceContext) -> None:
    data = _data(trace=trace)
    assert decode(data.pack()) == data
    assert decode(data.with_seq(9).pack()) == data.with_seq(9)
    end = Header(MessageKind.END, "x", 1, first=FirstToken(5), trace=trace)
    assert decode(end.pack()) == end
    assert len(data.pack()) == len(_data().pack()) == MESSAGE_SIZE
    assert decode(_data().traced(trace).pack()) == data


def test_a_bad_trace_context_is_rejected() -> None:
    with pytest.raises(ValueError):
        Header(MessageKind.ABORT, "x", 1, trace=TraceContext(1, 1)).pack()
    flags_at = 7
    trace_at = MESSAGE_SIZE - 4 - 24  # the trace block ends the body
    plain = _data().pack()
    with pytest.raises(ProtocolError, match="trace"):  # ids without the flag
        decode(_restamp(plain, trace_at, struct.pack("<3Q", 0, 1, 1)))
    with pytest.raises(ProtocolError, match="trace"):  # the flag with zero ids
        decode(_restamp(plain, flags_at, bytes([plain[flags_at] | 16])))
    with pytest.raises(ProtocolError, match="trace"):  # sampled without a context
        decode(_restamp(plain, flags_at, bytes([plain[flags_at] | 32])))
    abort = Header(MessageKind.ABORT, "x", 1).pack()
    traced = _restamp(abort, trace_at, struct.pack("<3Q", 0, 1, 1))
    with pytest.raises(ProtocolError, match="ABORT"):
        decode(_restamp(traced, flags_at, bytes([traced[flags_at] | 16])))
