"""The vocabulary both roles share: states, specs, rank identities and the role interfaces.

A transfer moves one request's prompt KV from a prefill instance into blocks that a
decode instance preallocated. Each rank of each side holds one role object:

* a **sender** (prefill rank): `open(spec)` once, `send_layer(...)` as each layer's KV
  is written (possibly several times per layer under chunked prefill), then
  `finish(transfer_id)` once the prompt is complete;
* a **receiver** (decode rank): `expect(spec)` before the sender starts.

Both sides answer `poll(transfer_id)` without blocking and accept `abort`. A transfer
is PENDING until its first slice moves, TRANSFERRING while slices move, then DONE or
FAILED(reason). The receiver's state is the one that decides the request: DONE there
means every block of every layer it owns has landed (and passed its checksum). DONE on
the sender means every slice was handed over and the source blocks may be reused.

A terminal transfer releases its resources at once (slot, staging buffers); `poll`
keeps answering for it from a bounded history. `num_active` counts the transfers that
still hold resources, for leak checks.
"""

from __future__ import annotations

import dataclasses
import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from telemetry import TraceContext

MAX_TRANSFER_ID_BYTES = 64
MAX_INSTANCE_NAME_BYTES = 64
MAX_TOP_LOGPROBS = 20  # top logprobs a first token carries at most (header field size)


class TransferState(enum.Enum):
    PENDING = "pending"
    TRANSFERRING = "transferring"
    DONE = "done"
    FAILED = "failed"


@dataclass(frozen=True)
class FirstToken:
    """The token a prefill instance sampled from the prompt, sent with the transfer's END
    so that the decode instance continues from it: its logprob and top logprobs when
    the request asked for them, how many tokens a seeded request's generator has drawn
    (`engine.sampling.skip_draws`), and time.time() when it was sampled."""

    token_id: int
    draws: int = 0
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()
    sampled_wall: float = 0.0

    def __post_init__(self) -> None:
        if self.token_id < 0 or self.draws < 0:
            raise ValueError(f"token_id and draws must be >= 0, got {self}")
        if len(self.top) > MAX_TOP_LOGPROBS:
            raise ValueError(f"top: {len(self.top)} logprobs, at most {MAX_TOP_LOGPROBS}")


@dataclass(frozen=True)
class TransferStatus:
    state: TransferState
    reason: str | None = None  # set when FAILED
    # time.monotonic() when the role reached this terminal state; a poll may come later.
    ended_at: float | None = field(default=None, compare=False)
    # A receiver's DONE for a transfer that expected one: the first token it brought.
    first: FirstToken | None = field(default=None, compare=False)

    @property
    def terminal(self) -> bool:
        return self.state in (TransferState.DONE, TransferState.FAILED)

    def ended_now(self) -> TransferStatus:
        """This status stamped with the current time.monotonic()."""
        return dataclasses.replace(self, ended_at=time.monotonic())

    def with_first(self, first: FirstToken | None) -> TransferStatus:
        return dataclasses.replace(self, first=first)


PENDING = TransferStatus(TransferState.PENDING)
TRANSFERRING = TransferStatus(TransferState.TRANSFERRING)
DONE = TransferStatus(TransferState.DONE)


def failed(reason: str) -> TransferStatus:
    return TransferStatus(TransferState.FAILED, reason)


# What a failure reason says happened, for metrics labels (a bounded set).
FAILURE_KINDS = (
    "timeout",
    "refused",
    "checksum",
    "connection",
    "aborted",
    "shutdown",
    "protocol",
    "other",
)
_FAILURE_WORDS = (
    ("timeout", ("timed out", "in time")),
    ("refused", ("refuse",)),
    ("checksum", ("checksum",)),
    ("connection", ("lost sender", "send to", "unreachable", "connect", "cannot read")),
    ("aborted", ("abort", "abandoned", "rejected")),
    ("shutdown", ("closed", "stopped")),
    ("protocol", ("unexpected", "expected block", "outside", "does not match", "incomplete")),
)


def failure_kind(reason: str | None) -> str:
    """The kind of a FAILED status's reason: one of FAILURE_KINDS."""
    text = (reason or "").lower()
    for kind, words in _FAILURE_WORDS:
        if any(w in text for w in words):
            return kind
    return "other"


@dataclass(frozen=True)
class TransferRecord:
    """One transfer's figures on one rank, once it is terminal (for metrics): the
    payload bytes and prompt blocks that moved, and the time from its first data
    message to its end (0 when no data moved)."""

    role: str  # "send" | "recv"
    ok: bool
    reason: str | None
    nbytes: int
    blocks: int
    duration_s: float

    @classmethod
    def ended(
        cls,
        role: str,
        status: TransferStatus,
        nbytes: int,
        blocks: int,
        first_data: float | None,
    ) -> TransferRecord:
        """The figures of a transfer that reached its terminal `status` just now:
        `first_data` is when (time.monotonic) its first data message moved, None when
        none did (then no blocks count)."""
        return cls(
            role,
            status.state is TransferState.DONE,
            status.reason,
            nbytes,
            max(0, blocks) if first_data is not None else 0,
            time.monotonic() - first_data if first_data is not None else 0.0,
        )


RecordSink = Callable[[TransferRecord], None]  # called once per transfer; must not block
# a transfer's id and terminal status, once per transfer; must not block
EndSink = Callable[[str, TransferStatus], None]


class TransferError(RuntimeError):
    """A transport-level failure: the transfers it touches become FAILED."""


class ProtocolError(TransferError):
    """A peer sent something malformed; the connection to it is dropped."""


def _check_name(kind: str, value: str, limit: int) -> None:
    if not value:
        raise ValueError(f"{kind} must not be empty")
    if len(value.encode()) > limit:
        raise ValueError(f"{kind} {value!r} is longer than {limit} bytes")
    if "\x00" in value:
        raise ValueError(f"{kind} must not contain NUL")


@dataclass(frozen=True)
class Parallelism:
    """An instance's sharding: `tp` ranks split the KV heads, `pp` stages split the layers.

    Ranks are numbered `pp_rank * tp + tp_rank`.
    """

    tp: int = 1
    pp: int = 1

    def __post_init__(self) -> None:
        if self.tp < 1 or self.pp < 1:
            raise ValueError(f"tp and pp must be >= 1, got tp={self.tp} pp={self.pp}")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    def rank(self, tp_rank: int, pp_rank: int) -> int:
        if not (0 <= tp_rank < self.tp and 0 <= pp_rank < self.pp):
            raise ValueError(f"rank (tp={tp_rank}, pp={pp_rank}) is outside {self}")
        return pp_rank * self.tp + tp_rank

    def coords(self, rank: int) -> tuple[int, int]:
        """(tp_rank, pp_rank) of a flat rank."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside {self}")
        return rank % self.tp, rank // self.tp


@dataclass(frozen=True)
class InstanceRef:
    """The other side of a transfer: an instance's name and its parallel layout."""

    name: str
    parallel: Parallelism = Parallelism()

    def __post_init__(self) -> None:
        _check_name("instance name", self.name, MAX_INSTANCE_NAME_BYTES)


@dataclass(frozen=True)
class RankId:
    """One rank of one instance, as peers and the rendezvous store know it."""

    instance: str
    rank: int

    def __post_init__(self) -> None:
        _check_name("instance name", self.instance, MAX_INSTANCE_NAME_BYTES)
        if self.rank < 0:
            raise ValueError(f"rank must be >= 0, got {self.rank}")

    def __str__(self) -> str:
        return f"{self.instance}/{self.rank}"


@dataclass(frozen=True)
class LocalRank:
    """Who a role object is: its instance, that instance's layout, and its coordinates."""

    instance: str
    parallel: Parallelism = Parallelism()
    tp_rank: int = 0
    pp_rank: int = 0

    def __post_init__(self) -> None:
        _check_name("instance name", self.instance, MAX_INSTANCE_NAME_BYTES)
        self.parallel.rank(self.tp_rank, self.pp_rank)  # validates the coordinates

    @property
    def rank(self) -> int:
        return self.parallel.rank(self.tp_rank, self.pp_rank)

    @property
    def id(self) -> RankId:
        return RankId(self.instance, self.rank)

    @property
    def ref(self) -> InstanceRef:
        return InstanceRef(self.instance, self.parallel)


@dataclass(frozen=True)
class RecvSpec:
    """What a decode rank expects: `block_ids[i]` receives prompt block `first_block + i`.

    `first_block` > 0 when the decode instance already holds the prompt's first blocks
    (a prefix-cache hit); the sender then skips them. The timeout runs from `expect`.
    With `first_token`, the transfer is DONE only once an END also brought the prompt's
    first token (`FirstToken`; the rank that drives the decode engine asks for it).
    """

    transfer_id: str
    block_ids: tuple[int, ...]
    source: InstanceRef
    first_block: int = 0
    timeout_s: float = 30.0
    first_token: bool = False

    def __post_init__(self) -> None:
        _check_name("transfer_id", self.transfer_id, MAX_TRANSFER_ID_BYTES)
        if not self.block_ids:
            raise ValueError("block_ids must not be empty")
        if len(set(self.block_ids)) != len(self.block_ids):
            raise ValueError("block_ids must be distinct")
        if min(self.block_ids) < 0:
            raise ValueError("block_ids must be >= 0")
        if self.first_block < 0:
            raise ValueError(f"first_block must be >= 0, got {self.first_block}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


@dataclass(frozen=True)
class SendSpec:
    """What a prefill rank sends: the prompt's blocks from `first_block` on, to `dest`.

    The timeout runs from `open` and covers the whole transfer, `finish` included.
    """

    transfer_id: str
    dest: InstanceRef
    first_block: int = 0
    timeout_s: float = 30.0
    trace: TraceContext | None = None  # the span this rank's sends are recorded under

    def __post_init__(self) -> None:
        _check_name("transfer_id", self.transfer_id, MAX_TRANSFER_ID_BYTES)
        if self.first_block < 0:
            raise ValueError(f"first_block must be >= 0, got {self.first_block}")
        if not self.timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0, got {self.timeout_s}")


class TransferSender(Protocol):
    """The prefill side of one rank. `send_layer` never waits on the network, nor does
    `finish` without `wait`."""

    def open(self, spec: SendSpec) -> None: ...

    def send_layer(
        self, transfer_id: str, layer: int, block_ids: Sequence[int], first_block: int
    ) -> None:
        """Queue `layer`'s K/V of prompt blocks `first_block...` held in local `block_ids`.

        `layer` is the model's (global) layer index. Called on the engine thread right
        after the layer wrote them; the blocks must stay unchanged until `finish(wait=True)`
        returns, or until `reading` is False.
        """
        ...

    def finish(self, transfer_id: str, wait: bool = True, first: FirstToken | None = None) -> None:
        """No more slices; END carries `first` (the rank that sampled the prompt's first
        token passes it). With `wait`, returns once the source blocks are no longer read
        (bounded by the deadline), which may mean once they are sent; without, at once,
        and the caller keeps the blocks unchanged until `reading` is False."""
        ...

    def reading(self, transfer_id: str) -> bool:
        """Whether a send may still read the transfer's source blocks: False once DONE
        (as soon as the pump is past the transfer's end), and after FAILED once the
        sends in flight have completed or failed (FAILED alone does not stop them: an
        abort leaves the pair up for other transfers)."""
        ...

    def poll(self, transfer_id: str) -> TransferStatus: ...

    def abort(self, transfer_id: str, reason: str = "aborted") -> None: ...

    @property
    def num_active(self) -> int: ...

    def close(self) -> None: ...


class TransferReceiver(Protocol):
    """The decode side of one rank. Nothing here waits on the network."""

    def expect(self, spec: RecvSpec) -> None: ...

    def poll(self, transfer_id: str) -> TransferStatus: ...

    def abort(self, transfer_id: str, reason: str = "aborted") -> None:
        """FAILED now; once this returns no write into the transfer's blocks can follow."""
        ...

    @property
    def num_active(self) -> int: ...

    def close(self) -> None: ...
