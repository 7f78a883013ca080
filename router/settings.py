"""The router deployment's settings, resolved from the cluster config by the builder
(deployments never parse raw config)."""

from __future__ import annotations

from dataclasses import dataclass, field

from registry import Role
from router.dispatch import DispatchTimeouts
from router.validation import Limits
from telemetry import TracingSettings


@dataclass(frozen=True)
class PoolSpec:
    name: str
    role: Role
    replicas: int
    tp: int
    pp: int


@dataclass(frozen=True)
class RouterSettings:
    cluster: str
    served_model: str
    model_dir: str
    max_model_len: int
    block_size: int
    redis_url: str
    lease_ttl_s: float
    pools: tuple[PoolSpec, ...]
    disaggregation_threshold: int
    limits: Limits
    timeouts: DispatchTimeouts
    max_inflight_requests: int
    max_request_bytes: int
    view_refresh_interval_s: float
    default_chat_max_tokens: int
    max_dispatch_attempts: int = 2  # tries before the first token, each elsewhere
    max_migrations: int = 2  # moves of a stream that broke mid-way (0: none)
    probe_timeout_s: float = 1.0  # probing an excluded instance before it returns
    tokenizer_threads: int = 2  # threads that tokenize prompts, off the event loop
    max_health_watches: int = 32  # concurrent gRPC health Watch streams
    health_watch_max_s: float = 300.0  # longest life of one Watch stream
    slo_ttft_s: float = float("inf")  # goodput: a request meets the SLO within both
    slo_tpot_s: float = float("inf")
    grpc_bearer_token: str | None = None
    http_api_key: str | None = None
    tracing: TracingSettings = field(default_factory=TracingSettings)

    @property
    def has_prefill_pool(self) -> bool:
        return any(p.role is Role.PREFILL for p in self.pools)
