"""The client's typed values and their proto conversions: what `Client` and
`AsyncClient` take (Sampling) and return (Chunk, Completion, ClusterState, ...)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from protos.pdserve.v1 import pdserve_pb2

Message = tuple[str, str]  # (role, content)
_FINISH = {
    pdserve_pb2.FINISH_REASON_STOP: "stop",
    pdserve_pb2.FINISH_REASON_LENGTH: "length",
    pdserve_pb2.FINISH_REASON_ABORT: "abort",
}
_ROLE = {
    pdserve_pb2.POOL_ROLE_PREFILL: "prefill",
    pdserve_pb2.POOL_ROLE_DECODE: "decode",
    pdserve_pb2.POOL_ROLE_COLOCATED: "colocated",
}


class ClientError(RuntimeError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{code.name}: {details}")
        self.code = code
        self.details = details


# How Serve's gRPC proxy reports the death of the replica that served a call: INTERNAL
# with Ray's actor error in the details. To the client that is UNAVAILABLE.
_REPLICA_GONE = re.compile(
    r"The actor \S+ is unavailable|actor died|ActorDiedError|ActorUnavailableError", re.I
)


def error_from(e: grpc.RpcError) -> ClientError:
    """The call's status as a ClientError; a replica's death reads as UNAVAILABLE."""
    code: grpc.StatusCode = e.code()
    details = e.details() or ""
    if code == grpc.StatusCode.INTERNAL and _REPLICA_GONE.search(details):
        code = grpc.StatusCode.UNAVAILABLE
    return ClientError(code, details)


@dataclass(frozen=True)
class Sampling:
    """Unset fields take the server's defaults."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    max_tokens: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None

    def to_proto(self) -> pdserve_pb2.SamplingParams:
        msg = pdserve_pb2.SamplingParams(
            stop=list(self.stop),
            stop_token_ids=list(self.stop_token_ids),
            ignore_eos=self.ignore_eos,
        )
        for name in ("temperature", "top_p", "top_k", "max_tokens", "seed", "logprobs"):
            value = getattr(self, name)
            if value is not None:
                setattr(msg, name, value)
        return msg


@dataclass(frozen=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_prompt_tokens: int


@dataclass(frozen=True)
class Timings:
    queue_ms: float
    prefill_ms: float
    kv_transfer_ms: float
    ttft_ms: float
    mean_tpot_ms: float
    disaggregated: bool
    migrations: int = 0  # times the stream moved to another decode instance


@dataclass(frozen=True)
class Chunk:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str | None = None  # set on the last chunk
    stop_reason: str | int | None = None
    usage: Usage | None = None
    timings: Timings | None = None
    logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class Completion:
    request_id: str
    token_ids: tuple[int, ...]
    text: str
    finish_reason: str
    stop_reason: str | int | None
    usage: Usage
    timings: Timings
    logprobs: tuple[float, ...] = ()


@dataclass(frozen=True)
class ModelCard:
    id: str
    max_model_len: int
    is_default: bool


@dataclass(frozen=True)
class InstanceLoad:
    queued_prefill_tokens: int
    running_seqs: int
    free_kv_blocks: int
    total_kv_blocks: int
    age_ms: float


@dataclass(frozen=True)
class Instance:
    instance_id: str
    pool: str
    role: str
    load: InstanceLoad | None


@dataclass(frozen=True)
class Pool:
    name: str
    role: str
    replicas: int
    tp: int
    pp: int
    instances: tuple[Instance, ...]


@dataclass(frozen=True)
class ClusterState:
    cluster: str
    pools: tuple[Pool, ...]

    @property
    def ready(self) -> bool:
        """Every pool has its configured number of live instances."""
        return all(len(p.instances) >= p.replicas for p in self.pools)


def build_request(
    prompt: str | None = None,
    *,
    token_ids: Sequence[int] | None = None,
    messages: Sequence[Message] | None = None,
    sampling: Sampling | None = None,
    model: str = "",
    client_tag: str = "",
) -> pdserve_pb2.GenerateRequest:
    req = pdserve_pb2.GenerateRequest(model=model, client_tag=client_tag)
    if prompt is not None:
        req.prompt = prompt
    if token_ids is not None:
        req.token_ids.ids.extend(token_ids)
    if messages is not None:
        req.chat.SetInParent()
        for role, content in messages:
            req.chat.messages.add(role=role, content=content)
    req.sampling.CopyFrom((sampling or Sampling()).to_proto())
    return req


def chunk_from(msg: pdserve_pb2.GenerateResponse) -> Chunk:
    finish = _FINISH.get(msg.finish_reason)
    stop: str | int | None = None
    which = msg.WhichOneof("stop_reason")
    if which == "stop_string":
        stop = msg.stop_string
    elif which == "stop_token_id":
        stop = msg.stop_token_id
    usage = timings = None
    if msg.HasField("usage"):
        u = msg.usage
        usage = Usage(u.prompt_tokens, u.completion_tokens, u.cached_prompt_tokens)
    if msg.HasField("timings"):
        t = msg.timings
        timings = Timings(
            t.queue_ms,
            t.prefill_ms,
            t.kv_transfer_ms,
            t.ttft_ms,
            t.mean_tpot_ms,
            t.disaggregated,
            t.migrations,
        )
    return Chunk(
        msg.request_id,
        tuple(msg.token_ids),
        msg.text,
        finish,
        stop,
        usage,
        timings,
        tuple(lp.logprob for lp in msg.logprobs),
    )


def completion_from(chunks: Sequence[Chunk]) -> Completion:
    if not chunks or chunks[-1].finish_reason is None:
        raise ClientError(grpc.StatusCode.INTERNAL, "the stream ended without a finish reason")
    last = chunks[-1]
    assert last.usage is not None and last.timings is not None
    return Completion(
        last.request_id,
        tuple(t for c in chunks for t in c.token_ids),
        "".join(c.text for c in chunks),
        last.finish_reason or "",
        last.stop_reason,
        last.usage,
        last.timings,
        tuple(lp for c in chunks for lp in c.logprobs),
    )


def state_from(msg: pdserve_pb2.ClusterStatusResponse) -> ClusterState:
    pools = []
    for p in msg.pools:
        instances = tuple(
            Instance(
                i.instance_id,
                i.pool,
                _ROLE.get(i.role, "unknown"),
                InstanceLoad(
                    i.load.queued_prefill_tokens,
                    i.load.running_seqs,
                    i.load.free_kv_blocks,
                    i.load.total_kv_blocks,
                    i.load.age_ms,
                )
                if i.HasField("load")
                else None,
            )
            for i in p.instances
        )
        pools.append(Pool(p.name, _ROLE.get(p.role, "unknown"), p.replicas, p.tp, p.pp, instances))
    return ClusterState(msg.cluster, tuple(pools))
