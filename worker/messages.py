"""Typed messages between the router and the worker pools.

The router calls the pools through Ray Serve handles; every argument and every
streamed item is one of these frozen dataclasses (Ray pickles them between Ray's own
processes; nothing here ever comes from a client connection). Ids are assigned by the
router: `request_id` for the request, `transfer_id` for its KV transfer.

Disaggregated, the router sends a `WorkerRequest` with a `RemotePrefillPlan` to the
decode pool and a `PrefillRequest` with the same transfer id to the prefill pool at the
same time. The decode stream is `TokenChunk`s; the last chunk has `finished` set and
carries `FinalStats`. The prompt's first token travels with its KV (kv_transfer's
header), so the prefill's `PrefillOutcome` only reports success and timings.

A stream that broke mid-way continues on another decode instance with the same
request plus a `Resume` (engine.resume): its tokens so far are computed with the
prompt, by the prefill pool or by the decode instance, and the stream goes on from
the next token.

Each request carries its trace context (`trace`: the trace id and the router's span
that the pool's spans hang under; None when tracing is off or the request was not
sampled in), so one request's spans form one trace across processes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from engine import Resume, SamplingParams, TokenLogprob
from engine.config import EngineConfig
from kv_transfer.base import Parallelism
from kv_transfer.faults import Fault
from kv_transfer.transport import TransportKind
from registry.types import Role
from telemetry import TraceContext, TracingSettings


class FallbackReason(StrEnum):
    """Why a request planned for a remote prefill was prefilled on the decode instance.
    The value is the label of the router's fallback metric."""

    DECODE_FULL = "decode_full"  # no free blocks or transfer slot for the transfer
    # the KV transfer (with the first token) failed or timed out, the prefill instance's
    # failure included: its sender aborts the transfer
    TRANSFER_FAILED = "transfer"
    # the router saw the remote prefill fail (the call raised, the instance died, or it
    # reported a failed transfer) and told the decode instance, which did not wait for
    # the transfer's timeout
    PREFILL_FAILED = "prefill_failed"


@dataclass(frozen=True)
class WorkerSettings:
    """Everything a pool's replica needs, resolved by the cluster builder: its engine's
    config (`engine`, validated when built) and how the replica joins the cluster."""

    cluster: str
    pool: str
    role: Role
    engine: EngineConfig  # model = the resolved model directory; tp/pp = the layout
    redis_url: str
    lease_ttl_s: float
    load_report_interval_s: float
    transport: TransportKind
    transfer_host: str
    transfer_timeout_s: float
    # Ray resources of one rank: a TP/PP replica places ranks 1..N-1 with them
    rank_resources: dict[str, float] = field(default_factory=lambda: {"CPU": 1.0})
    rank_timeout_s: float = 60.0  # one collective among the ranks
    rank_start_timeout_s: float = 120.0  # the ranks joining a new replica
    faults: tuple[Fault, ...] = ()  # a fault drill's injected KV-transfer faults
    # the cluster secret sealing KV control HELLOs (kv_transfer.auth); None: unsealed
    transfer_secret: str | None = field(default=None, repr=False)
    # serves both roles (`dual_worker`): the routing table says which it takes
    switchable: bool = False
    tracing: TracingSettings = field(default_factory=TracingSettings)


@dataclass(frozen=True)
class RemotePrefillPlan:
    """Tells a decode replica that `source` computes the prompt and pushes its KV."""

    transfer_id: str
    source_instance: str
    timeout_s: float
    source_parallel: Parallelism = field(
        default_factory=Parallelism
    )  # the prefill instance's TP/PP layout


@dataclass(frozen=True)
class WorkerRequest:
    request_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    arrival_wall: float  # time.time() when the router received the request
    remote: RemotePrefillPlan | None = None
    # a migrated stream: the tokens another decode instance generated and the text the
    # client has; they are computed with the prompt (remotely when `remote` is set)
    resume: Resume | None = None
    trace: TraceContext | None = None


@dataclass(frozen=True)
class FinalStats:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int
    queue_s: float  # engine arrival to first scheduled (decode side)
    prefill_s: float  # first scheduled to first token (decode side; 0 when remote)
    kv_transfer_s: float  # prefill's first token to the KV landing here (remote only)
    tpot_s: float  # mean time per output token after the first, as the engine made them
    disaggregated: bool  # the prompt's KV came from a prefill instance
    fallback_reason: str = ""  # set when a remote prefill was recomputed locally
    fallback: FallbackReason | None = None  # the kind of that fallback


@dataclass(frozen=True)
class TokenChunk:
    token_ids: tuple[int, ...]
    text: str
    logprobs: tuple[TokenLogprob, ...] = ()
    finished: bool = False
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: str | int | None = None
    final: FinalStats | None = None


@dataclass(frozen=True)
class PrefillRequest:
    request_id: str
    transfer_id: str
    prompt_token_ids: tuple[int, ...]
    params: SamplingParams
    dest_instance: str
    timeout_s: float
    dest_parallel: Parallelism = field(
        default_factory=Parallelism
    )  # the decode instance's TP/PP layout
    resume: Resume | None = None  # a migrated stream's tokens so far, computed too
    trace: TraceContext | None = None


@dataclass(frozen=True)
class PrefillOutcome:
    """What a prefill replica reports once the prompt is computed and its KV sent (the
    first token went with the KV): for the router's metrics and cleanup."""

    ok: bool
    reason: str = ""
    queue_s: float = 0.0
    prefill_s: float = 0.0
    cached_prompt_tokens: int = 0
    # The first token's sampling to the sends of the transfer (its END included)
    # completing, on this instance's clock: the transfer time TTFT sees.
    kv_transfer_s: float = 0.0


@dataclass(frozen=True)
class WorkerState:
    """A replica's resources, for ClusterStatus details and leak checks."""

    instance_id: str
    pool: str
    role: Role
    num_requests: int  # requests the engine still holds
    num_streams: int  # open output streams
    free_blocks: int
    total_blocks: int
    active_transfers: int  # sender or receiver transfers still holding resources
    pending_remote_prefills: int
    remote_prefill_fallbacks: int
    transfer_failures: int
    heartbeat_running: bool
    extra: dict[str, int] = field(default_factory=dict)
