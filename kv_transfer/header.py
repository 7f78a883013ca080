"""Fixed-layout messages: packed with `struct`, never pickled.

Every message on a control channel is exactly `MESSAGE_SIZE` bytes, little-endian, and
ends with a CRC32 of the bytes before it. The kinds:

* HELLO opens a connection: the sender's instance, rank and layout, plus a random
  token that names the pair's process group in the receiver's store.
* DATA announces one slice: transfer id, layer (and a count of consecutive layers
  with the same heads and blocks, 1 unless the transport takes several at once), KV-head
  range, block range, dtype, shape, payload size, whether the payload moves whole or as
  one part per layer and K/V, and an optional payload checksum. Its payload follows on
  the transport's data path (torch.distributed recvs, or already in shared memory).
* END says a sender rank has sent everything it will send for a transfer. The rank
  that sampled the prompt's first token sends it with END (`FirstToken`: token id,
  sampler draws, logprob and up to `MAX_TOP_LOGPROBS` top logprobs, sampling time),
  in a fixed-size block that every message has (zeros unless the flag says so).
* ABORT says a sender rank gave up on a transfer.

DATA and END may carry a trace context (`telemetry.TraceContext`: the 128-bit trace
id, the 64-bit id of the sender's span that sent the message, the sampled flag), so the
receiver's spans join the request's trace; zeros unless the flag says so.

`seq` numbers DATA/END/ABORT per connection from 0, so a lost message shows as a gap.
Decoding validates every field it can without context and raises ProtocolError.
"""

from __future__ import annotations

import dataclasses
import enum
import struct
import zlib
from dataclasses import dataclass

import torch

from kv_transfer.base import (
    MAX_INSTANCE_NAME_BYTES,
    MAX_TOP_LOGPROBS,
    MAX_TRANSFER_ID_BYTES,
    FirstToken,
    ProtocolError,
)
from telemetry import TraceContext

MAGIC = b"PDKV"
VERSION = 4  # 3: the first-token block; 4: the trace context
MAX_DIMS = 6

_DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 1,
    torch.bfloat16: 2,
    torch.float16: 3,
    torch.float64: 4,
    torch.uint8: 5,
    torch.int8: 6,
    torch.float8_e4m3fn: 7,
    torch.float8_e5m2: 8,
}
_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


class MessageKind(enum.IntEnum):
    HELLO = 1
    DATA = 2
    END = 3
    ABORT = 4


_FLAG_CHECKSUM = 1
_FLAG_PARTS = 2
_FLAG_FIRST = 4  # END carries the first token
_FLAG_LOGPROB = 8  # ... and its logprob
_FLAG_TRACE = 16  # a trace context
_FLAG_SAMPLED = 32  # ... whose trace is sampled
_FLAGS = _FLAG_CHECKSUM | _FLAG_PARTS | _FLAG_FIRST | _FLAG_LOGPROB | _FLAG_TRACE | _FLAG_SAMPLED
_MASK64 = (1 << 64) - 1

# magic, version, kind, dtype, flags, transfer id, src rank, seq, layer, head start,
# head count, block start, block count, layer count, ndim, shape[6], payload bytes,
# checksum.
# checksum, then the first-token block: token id, draws, number of top logprobs,
# sampling time, logprob, top token ids, top logprobs; then the trace context: trace id
# (high and low 64 bits), span id.
_HEADER = struct.Struct(
    f"<4sBBBB{MAX_TRANSFER_ID_BYTES}s9I{MAX_DIMS}IQQ3Idf{MAX_TOP_LOGPROBS}I{MAX_TOP_LOGPROBS}f3Q"
)
_NO_FIRST = (0, 0, 0, 0.0, 0.0, *([0] * MAX_TOP_LOGPROBS), *([0.0] * MAX_TOP_LOGPROBS))
_FIRST_FIELDS = len(_NO_FIRST)
# magic, version, kind, two pad bytes, instance, rank, tp, pp, group token.
_HELLO = struct.Struct(f"<4sBB2x{MAX_INSTANCE_NAME_BYTES}s3I16s")
_CRC = struct.Struct("<I")
MESSAGE_SIZE = _HEADER.size + _CRC.size
TOKEN_BYTES = 16


def dtype_code(dtype: torch.dtype) -> int:
    try:
        return _DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot be transferred") from None


@dataclass(frozen=True)
class Header:
    """A DATA, END or ABORT message. Layer and heads are global indices."""

    kind: MessageKind
    transfer_id: str
    src_rank: int
    seq: int = 0
    layer: int = 0
    head_start: int = 0
    head_count: int = 0
    block_start: int = 0
    block_count: int = 0
    dtype: torch.dtype = torch.uint8
    shape: tuple[int, ...] = ()
    nbytes: int = 0
    checksum: int | None = None
    layer_count: int = 1  # layers layer .. layer + layer_count - 1, same heads and blocks
    parts: bool = False  # the payload moves as one part per layer and K/V, not whole
    first: FirstToken | None = None  # END only: the prompt's first token
    trace: TraceContext | None = None  # DATA and END: the sending span, for tracing

    @property
    def layers(self) -> range:
        return range(self.layer, self.layer + self.layer_count)

    def with_seq(self, seq: int) -> Header:
        return self._with(seq=seq)

    def with_checksum(self, checksum: int) -> Header:
        return self._with(checksum=checksum)

    def in_parts(self, parts: bool) -> Header:
        return self._with(parts=parts)

    def traced(self, trace: TraceContext | None) -> Header:
        return self._with(trace=trace)

    def _with(self, **changes: object) -> Header:
        """A copy with `changes`. Every message is stamped on its way out, so this
        copies the fields directly: `dataclasses.replace` costs 10x as much, and a
        header has nothing to validate on construction."""
        if not changes.keys() <= _FIELDS:
            raise TypeError(f"unknown header fields {sorted(changes.keys() - _FIELDS)}")
        new = object.__new__(Header)
        new.__dict__.update(self.__dict__, **changes)
        return new

    def pack(self) -> bytes:
        if self.kind is MessageKind.HELLO:
            raise ValueError("use Hello for HELLO messages")
        if len(self.shape) > MAX_DIMS:
            raise ValueError(f"shape {self.shape} has more than {MAX_DIMS} dims")
        if self.first is not None and self.kind is not MessageKind.END:
            raise ValueError("only END carries a first token")
        shape = (*self.shape, *([0] * (MAX_DIMS - len(self.shape))))
        flags = (_FLAG_CHECKSUM if self.checksum is not None else 0) | (
            _FLAG_PARTS if self.parts else 0
        )
        first: tuple[int | float, ...] = _NO_FIRST
        if self.first is not None:
            first = _pack_first(self.first)
            flags |= _FLAG_FIRST | (_FLAG_LOGPROB if self.first.logprob is not None else 0)
        trace = (0, 0, 0)
        if self.trace is not None:
            if self.kind is MessageKind.ABORT:
                raise ValueError("ABORT carries no trace context")
            t = self.trace
            trace = (t.trace_id >> 64, t.trace_id & _MASK64, t.span_id)
            flags |= _FLAG_TRACE | (_FLAG_SAMPLED if t.sampled else 0)
        body = _HEADER.pack(
            MAGIC,
            VERSION,
            int(self.kind),
            dtype_code(self.dtype),
            flags,
            self.transfer_id.encode(),
            self.src_rank,
            self.seq,
            self.layer,
            self.head_start,
            self.head_count,
            self.block_start,
            self.block_count,
            self.layer_count,
            len(self.shape),
            *shape,
            self.nbytes,
            self.checksum or 0,
            *first,
            *trace,
        )
        return body + _CRC.pack(zlib.crc32(body))


def _pack_first(f: FirstToken) -> tuple[int | float, ...]:
    pad = MAX_TOP_LOGPROBS - len(f.top)
    ids = [t for t, _ in f.top] + [0] * pad
    lps = [lp for _, lp in f.top] + [0.0] * pad
    logprob = f.logprob if f.logprob is not None else 0.0
    return (f.token_id, f.draws, len(f.top), f.sampled_wall, logprob, *ids, *lps)


def _unpack_first(flags: int, fields: tuple[int | float, ...]) -> FirstToken | None:
    token, draws, n_top, wall, logprob = fields[:5]
    if not flags & _FLAG_FIRST:
        return None
    n = int(n_top)
    if n > MAX_TOP_LOGPROBS:
        raise ProtocolError(f"first token with {n} top logprobs")
    ids = fields[5 : 5 + n]
    lps = fields[5 + MAX_TOP_LOGPROBS : 5 + MAX_TOP_LOGPROBS + n]
    top = tuple((int(t), float(lp)) for t, lp in zip(ids, lps, strict=True))
    lp = float(logprob) if flags & _FLAG_LOGPROB else None
    return FirstToken(int(token), int(draws), lp, top, float(wall))


_FIELDS = frozenset(f.name for f in dataclasses.fields(Header))


@dataclass(frozen=True)
class Hello:
    """Opens a connection from sender rank `rank` of `instance` (laid out `tp` x `pp`)."""

    instance: str
    rank: int
    tp: int
    pp: int
    token: bytes  # TOKEN_BYTES random bytes naming the pair's process group

    def pack(self) -> bytes:
        if len(self.token) != TOKEN_BYTES:
            raise ValueError(f"token must be {TOKEN_BYTES} bytes")
        body = _HELLO.pack(
            MAGIC,
            VERSION,
            int(MessageKind.HELLO),
            self.instance.encode(),
            self.rank,
            self.tp,
            self.pp,
            self.token,
        )
        body = body.ljust(_HEADER.size, b"\x00")
        return body + _CRC.pack(zlib.crc32(body))


def _text(raw: bytes, what: str) -> str:
    try:
        text = raw.rstrip(b"\x00").decode()
    except UnicodeDecodeError:
        raise ProtocolError(f"{what} is not UTF-8") from None
    if not text or "\x00" in text:
        raise ProtocolError(f"{what} is empty or malformed")
    return text


def decode(buf: bytes) -> Header | Hello:
    """Parse one message; raise ProtocolError on anything malformed."""
    if len(buf) != MESSAGE_SIZE:
        raise ProtocolError(f"message is {len(buf)} bytes, expected {MESSAGE_SIZE}")
    body, (crc,) = buf[: _HEADER.size], _CRC.unpack(buf[_HEADER.size :])
    if zlib.crc32(body) != crc:
        raise ProtocolError("message CRC mismatch")
    if body[:4] != MAGIC or body[4] != VERSION:
        raise ProtocolError(f"bad magic/version {body[:5]!r}")
    try:
        kind = MessageKind(body[5])
    except ValueError:
        raise ProtocolError(f"unknown message kind {body[5]}") from None
    if kind is MessageKind.HELLO:
        return _decode_hello(body)
    return _decode_header(kind, body)


def _decode_hello(body: bytes) -> Hello:
    _, _, _, name, rank, tp, pp, token = _HELLO.unpack(body[: _HELLO.size])
    if tp < 1 or pp < 1 or rank >= tp * pp:
        raise ProtocolError(f"HELLO with rank {rank} outside tp={tp} pp={pp}")
    return Hello(_text(name, "instance name"), rank, tp, pp, token)


def _decode_header(kind: MessageKind, body: bytes) -> Header:
    fields = _HEADER.unpack(body)
    _, _, _, code, flags, tid, src, seq, layer, h0, hn, b0, bn, nl, ndim = fields[:15]
    shape_all = fields[15 : 15 + MAX_DIMS]
    nbytes, checksum = fields[15 + MAX_DIMS], fields[16 + MAX_DIMS]
    if code not in _DTYPES:
        raise ProtocolError(f"unknown dtype code {code}")
    if nl < 1:
        raise ProtocolError(f"layer count {nl}")
    if flags & ~_FLAGS:
        raise ProtocolError(f"unknown flags {flags:#x}")
    if flags & (_FLAG_FIRST | _FLAG_LOGPROB) and kind is not MessageKind.END:
        raise ProtocolError(f"{kind.name} with a first token")
    if flags & _FLAG_LOGPROB and not flags & _FLAG_FIRST:
        raise ProtocolError("a logprob without a first token")
    try:
        first = _unpack_first(flags, fields[17 + MAX_DIMS : 17 + MAX_DIMS + _FIRST_FIELDS])
    except ValueError as e:
        raise ProtocolError(f"bad first token: {e}") from None
    trace = _unpack_trace(kind, flags, fields[17 + MAX_DIMS + _FIRST_FIELDS :])
    if ndim > MAX_DIMS or any(shape_all[ndim:]):
        raise ProtocolError(f"bad shape rank {ndim}")
    return Header(
        kind,
        _text(tid, "transfer id"),
        src,
        seq,
        layer,
        h0,
        hn,
        b0,
        bn,
        _DTYPES[code],
        tuple(shape_all[:ndim]),
        nbytes,
        checksum if flags & _FLAG_CHECKSUM else None,
        nl,
        bool(flags & _FLAG_PARTS),
        first,
        trace,
    )


def _unpack_trace(
    kind: MessageKind, flags: int, fields: tuple[int | float, ...]
) -> TraceContext | None:
    hi, lo, span = (int(f) for f in fields)
    if not flags & _FLAG_TRACE:
        if flags & _FLAG_SAMPLED or hi or lo or span:
            raise ProtocolError("trace fields without the trace flag")
        return None
    if kind is MessageKind.ABORT:
        raise ProtocolError("ABORT with a trace context")
    try:
        return TraceContext((hi << 64) | lo, span, bool(flags & _FLAG_SAMPLED))
    except ValueError as e:
        raise ProtocolError(f"bad trace context: {e}") from None
