"""Routing policy: which decode instance, and which prefill instance if any.

The policy is a pure function of a `RouteRequest` (prompt length and block hashes) and
the candidates the cluster view offers, so it can be tested without a cluster and
replaced (KV-aware routing) without touching the router. Each `Candidate` carries the
instance's latest load report plus what this router sent it since that report.

`LoadBalancedPolicy` (v1):

* decode: among instances with enough free KV blocks for the prompt (all of them when
  none has), the fewest active sequences; ties go to more free blocks, then to more of
  the prompt already cached there, then to the instance id;
* conditional disaggregation: the prompt minus what the chosen decode instance already
  caches is the uncached part. When it is at least `disaggregation_threshold` tokens
  and a prefill instance exists, the prompt is prefilled remotely; otherwise the
  decode instance prefills it itself (the colocated path);
* prefill: the fewest queued prefill tokens; ties go to the instance id.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Candidate:
    instance_id: str
    address: str  # the Serve replica's unique id, for pinned calls
    queued_prefill_tokens: int  # report + sent since the report
    running_seqs: int  # report + sent since the report
    free_blocks: int | None  # None: no load report yet
    cached_blocks: int = 0  # leading blocks of this prompt in the instance's cache
    tp: int = 1  # the instance's layout, which its KV-transfer peers shard against
    pp: int = 1
    pool: str = ""  # the deployment that serves it ("": the one of its role)


@dataclass(frozen=True)
class RouteRequest:
    num_prompt_tokens: int
    block_size: int


@dataclass(frozen=True)
class RouteDecision:
    decode: Candidate
    prefill: Candidate | None  # None: the decode instance prefills
    uncached_tokens: int


class NoInstanceAvailable(RuntimeError):
    """No live decode instance: the request cannot be served now."""


class RoutingPolicy(Protocol):
    def route(
        self,
        request: RouteRequest,
        decode: Sequence[Candidate],
        prefill: Sequence[Candidate],
    ) -> RouteDecision: ...


class LoadBalancedPolicy:
    def __init__(self, disaggregation_threshold: int) -> None:
        if disaggregation_threshold < 0:
            raise ValueError("disaggregation_threshold must be >= 0")
        self.threshold = disaggregation_threshold

    def route(
        self,
        request: RouteRequest,
        decode: Sequence[Candidate],
        prefill: Sequence[Candidate],
    ) -> RouteDecision:
        if not decode:
            raise NoInstanceAvailable("no live decode instance")
        need = -(-request.num_prompt_tokens // request.block_size)
        roomy = [c for c in decode if c.free_blocks is None or c.free_blocks >= need]
        chosen = min(
            roomy or decode,
            key=lambda c: (
                c.running_seqs,
                -(c.free_blocks or 0),
                -c.cached_blocks,
                c.instance_id,
            ),
        )
        cached = min(chosen.cached_blocks * request.block_size, request.num_prompt_tokens)
        uncached = request.num_prompt_tokens - cached
        remote = None
        if prefill and uncached >= self.threshold:
            remote = min(prefill, key=lambda c: (c.queued_prefill_tokens, c.instance_id))
        return RouteDecision(chosen, remote, uncached)
