"""The cluster's typed configuration.

`cluster.config_file.load_config` builds one from YAML plus command-line overrides.
Every field has a description and bounds; cross-field rules are checked when the
config is built, so a bad config fails before anything starts, with the field named:

* pool names are unique; there is exactly one pool that generates tokens (role
  `decode` or `colocated`) and at most one `prefill` pool; a `prefill` pool needs a
  `decode` pool and a `decode` pool needs a `prefill` pool (without one, use
  `colocated`);
* every pool uses the same KV block size (blocks move 1:1 and prefix hashes must
  agree);
* the HTTP and gRPC ports differ; the heartbeat-driven load report is more frequent
  than the lease TTL; the router's prompt limit is below the context length.

Checks that need the model's shape (KV cache size, TP/PP geometry) run in the builder.
The router's and the API server's sections live in cluster/router_config.py.
"""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import (
    BaseModel,
    ByteSize,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)

from cluster.k8s.settings import KubernetesSettings
from cluster.router_config import Port, RouterConfig, ServerConfig
from engine.config import CpuLinearKind
from kv_transfer.transport import TransportKind
from registry import Role
from registry.types import NAME_PATTERN

Name = Annotated[str, Field(pattern=NAME_PATTERN)]
_STRICT = ConfigDict(extra="forbid")
MIN_TRANSFER_SECRET_CHARS = 32


class ConfigError(ValueError):
    """The config is invalid; the message names every bad field."""


class ModelSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    source: str = Field(
        default="smollm2-135m-instruct",
        description="A known model name, an HF-format directory, or a .gguf file.",
    )
    served_name: str | None = Field(
        default=None,
        description="The model id clients use and ListModels reports; default: the "
        "source's base name.",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        default="float32", description="Weights and KV cache dtype."
    )
    max_model_len: int = Field(
        default=2048, ge=2, le=1 << 20, description="Prompt plus output tokens per request."
    )

    @property
    def served_id(self) -> str:
        return self.served_name or Path(self.source.rstrip("/")).name.removesuffix(".gguf")


class EngineLimits(BaseModel):
    model_config = _STRICT

    block_size: int = Field(default=16, ge=1, le=256, description="Tokens per KV block.")
    kv_cache_bytes: ByteSize = Field(
        default=ByteSize(256 << 20),
        description="KV cache per rank, e.g. '512MiB' (a TP/PP rank holds its share of the "
        "layers and KV heads).",
    )
    max_num_batched_tokens: int = Field(
        default=2048, ge=1, description="Token budget of one engine step (chunked prefill)."
    )
    max_num_seqs: int = Field(default=64, ge=1, description="Sequences running at once.")
    num_threads: int | None = Field(
        default=None, ge=1, description="torch threads per engine; default: the CPUs per rank."
    )
    enable_prefix_caching: bool = Field(default=True, description="Reuse cached prompt blocks.")
    cpu_linear: CpuLinearKind = Field(
        default="auto",
        description="CPU ranks' matmuls: native (the engine's fp32 kernels), onednn, plain, "
        "or auto (per row class, whichever measured fastest at load).",
    )
    cpu_linear_min_gain: float = Field(
        default=0.10,
        ge=0,
        le=10,
        description="With cpu_linear=auto, a row class keeps a packed copy of the weights of "
        "its own only if it measured more than this fraction faster than the copies the "
        "other classes keep.",
    )


class PoolConfig(BaseModel):
    model_config = _STRICT

    name: Name = Field(description="Pool name; also the Serve deployment's name.")
    role: Role = Field(description="prefill, decode or colocated.")
    replicas: int = Field(default=1, ge=1, le=1024, description="Engine replicas in the pool.")
    tp: int = Field(default=1, ge=1, le=64, description="Tensor-parallel ranks per replica.")
    pp: int = Field(default=1, ge=1, le=64, description="Pipeline-parallel stages per replica.")
    resources_per_rank: dict[str, float] = Field(
        default_factory=lambda: {"CPU": 1.0},
        description='Ray resources per rank, e.g. {"CPU": 1} or {"GPU": 1, "CPU": 2}.',
    )
    placement_strategy: Literal["STRICT_PACK", "PACK", "SPREAD", "STRICT_SPREAD"] = Field(
        default="STRICT_PACK", description="How a replica's ranks are placed (its placement group)."
    )
    rank_timeout_s: float = Field(
        default=60.0,
        gt=0,
        description="TP/PP: longest one collective may wait for a rank; then the replica fails "
        "its requests and its health check.",
    )
    rank_start_timeout_s: float = Field(
        default=120.0, gt=0, description="TP/PP: longest the ranks of a new replica take to join."
    )
    graceful_shutdown_timeout_s: float = Field(
        default=30.0,
        ge=2.0,
        le=3600.0,
        description="How long a replica that Serve stops (scale-down, redeploy) keeps serving "
        "its streams; a decode stream still running after half of it moves to another "
        "instance.",
    )
    engine: EngineLimits = Field(
        default_factory=lambda: EngineLimits.model_validate({}), description="Engine limits."
    )

    @field_validator("resources_per_rank")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        if any(amount < 0 for amount in v.values()):
            raise ValueError("resource amounts must be >= 0")
        if v.get("CPU", 0) <= 0 and v.get("GPU", 0) <= 0:
            raise ValueError("each rank needs some CPU or GPU")
        return v

    @property
    def world_size(self) -> int:
        return self.tp * self.pp

    @property
    def device(self) -> str:
        return "cuda" if self.resources_per_rank.get("GPU", 0) > 0 else "cpu"

    @property
    def num_threads(self) -> int:
        if self.engine.num_threads is not None:
            return self.engine.num_threads
        return max(1, int(self.resources_per_rank.get("CPU", 1)))


def default_pools() -> list[PoolConfig]:
    return [
        PoolConfig.model_validate({"name": "prefill", "role": Role.PREFILL}),
        PoolConfig.model_validate({"name": "decode", "role": Role.DECODE}),
    ]


class RedisConfig(BaseModel):
    model_config = _STRICT

    url: str | None = Field(
        default=None, description="redis://, rediss:// or unix:// URL; None: start an embedded one."
    )
    port: Port | None = Field(default=None, description="Embedded server's port; None: a free one.")
    lease_ttl_s: float = Field(default=10.0, gt=0, description="Registry lease TTL.")
    load_report_interval_s: float = Field(
        default=0.5, gt=0, description="How often instances publish load and cached blocks."
    )

    @field_validator("url")
    @classmethod
    def _scheme(cls, v: str | None) -> str | None:
        if v is not None and not v.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must start with redis://, rediss:// or unix://")
        return v

    @model_validator(mode="after")
    def _intervals(self) -> RedisConfig:
        if self.load_report_interval_s >= self.lease_ttl_s:
            raise ValueError("load_report_interval_s must be shorter than lease_ttl_s")
        return self


class FaultSpec(BaseModel):
    """One injected KV-transfer fault (see kv_transfer.faults)."""

    model_config = _STRICT

    kind: Literal["drop", "delay", "corrupt", "kill"] = Field(
        description="drop, delay, corrupt or kill (the prefill replica dies)."
    )
    after: int = Field(default=0, ge=0, description="First DATA message it hits.")
    times: int = Field(default=1, ge=0, description="Messages it hits; 0: all from `after`.")
    delay_s: float = Field(default=0.0, ge=0, description="Delay of a delay fault.")


class KVTransferConfig(BaseModel):
    model_config = _STRICT

    transport: TransportKind = Field(
        default=TransportKind.TORCH_DIST,
        description="torch_dist (Gloo/NCCL; any hosts) or shm (prefill and decode on one host).",
    )
    host: str = Field(
        default="127.0.0.1",
        description="Address torch_dist receivers bind and advertise; 'auto': each "
        "replica's node IP as Ray sees it (clusters spanning hosts, Kubernetes).",
    )
    timeout_s: float = Field(default=30.0, gt=0, description="Deadline of one transfer.")
    faults: list[FaultSpec] = Field(
        default_factory=list,
        description="Fault drill: faults each prefill replica injects into the KV it "
        "sends, counted per replica. Empty in production.",
    )
    secret: SecretStr | None = Field(
        default=None,
        description="Cluster secret sealing the KV control channels' HELLOs (HMAC-SHA256), "
        f"at least {MIN_TRANSFER_SECRET_CHARS} characters. None: generated for each "
        "`pdserve up` (and each build of the application); on Kubernetes it comes from a "
        "Secret (kubernetes.secrets.kv_transfer_secret). Never stored in Redis.",
    )

    @field_validator("secret")
    @classmethod
    def _secret_length(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None and len(v.get_secret_value()) < MIN_TRANSFER_SECRET_CHARS:
            raise ValueError(f"must be at least {MIN_TRANSFER_SECRET_CHARS} characters")
        return v


class TracingConfig(BaseModel):
    """Request traces (OpenTelemetry spans) from every process on the request path."""

    model_config = _STRICT

    enabled: bool = Field(default=True, description="Record spans for requests.")
    sample_ratio: float = Field(
        default=1.0, ge=0.0, le=1.0, description="Share of requests traced, decided at the router."
    )
    otlp_endpoint: str | None = Field(
        default=None,
        description="OTLP/HTTP traces endpoint (http[s]://host:4318/v1/traces); unset: the "
        "last `max_requests` requests' spans stay in the cluster's Redis for `pdserve trace`.",
    )
    max_requests: int = Field(
        default=256, ge=1, le=100_000, description="Requests whose spans the store keeps."
    )
    max_spans_per_request: int = Field(
        default=4096, ge=16, le=1_000_000, description="Spans kept per request."
    )
    retention_s: float = Field(
        default=3600.0, gt=0, description="A stored trace expires this long after its last span."
    )

    @field_validator("otlp_endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is None:
            return v
        url = urlparse(v)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"must be an http(s) URL with a host, got {v!r}")
        return v


class RayConfig(BaseModel):
    model_config = _STRICT

    address: str | None = Field(
        default=None, description="Existing Ray cluster; None: start local Ray."
    )
    num_cpus: int | None = Field(
        default=None,
        ge=1,
        description="Logical CPUs of a local Ray; default: enough for the pools.",
    )
    metrics_export_port: int | None = Field(
        default=None,
        ge=1,
        le=65535,
        description="Port of a local Ray's Prometheus metrics export (every process's "
        "metrics); None: Ray picks one, recorded in the run state.",
    )
    metrics_report_interval_s: float = Field(
        default=2.0,
        gt=0,
        le=60,
        description="How often each process of a local Ray reports its metrics to the export.",
    )


class ClusterConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    name: Name = Field(default="pdserve", description="Cluster name; namespaces every Redis key.")
    model: ModelSettings = Field(default_factory=lambda: ModelSettings.model_validate({}))
    pools: list[PoolConfig] = Field(default_factory=default_pools, min_length=1)
    router: RouterConfig = Field(default_factory=lambda: RouterConfig.model_validate({}))
    server: ServerConfig = Field(default_factory=lambda: ServerConfig.model_validate({}))
    redis: RedisConfig = Field(default_factory=lambda: RedisConfig.model_validate({}))
    kv_transfer: KVTransferConfig = Field(
        default_factory=lambda: KVTransferConfig.model_validate({})
    )
    ray: RayConfig = Field(default_factory=lambda: RayConfig.model_validate({}))
    tracing: TracingConfig = Field(default_factory=lambda: TracingConfig.model_validate({}))
    kubernetes: KubernetesSettings = Field(
        default_factory=lambda: KubernetesSettings.model_validate({}),
        description="Only for `pdserve render k8s` (cluster/k8s/settings.py).",
    )

    @model_validator(mode="after")
    def _topology(self) -> ClusterConfig:
        names = [p.name for p in self.pools]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"pools: duplicate pool names {dup}")
        roles = [p.role for p in self.pools]
        generating = [p for p in self.pools if p.role is not Role.PREFILL]
        if len(generating) != 1:
            raise ValueError(
                f"pools: need exactly one decode or colocated pool, got {len(generating)}"
            )
        if roles.count(Role.PREFILL) > 1:
            raise ValueError("pools: at most one prefill pool")
        if Role.PREFILL in roles and Role.DECODE not in roles:
            raise ValueError("pools: a prefill pool needs a decode pool (not colocated)")
        if Role.DECODE in roles and Role.PREFILL not in roles:
            raise ValueError(
                "pools: a decode pool needs a prefill pool; without one use role colocated"
            )
        sizes = {p.engine.block_size for p in self.pools}
        if len(sizes) > 1:
            raise ValueError(
                f"pools[*].engine.block_size: all pools must agree, got {sorted(sizes)}"
            )
        if self.server.http_port == self.server.grpc_port:
            raise ValueError("server.grpc_port: must differ from server.http_port")
        mp = self.router.max_prompt_tokens
        if mp is not None and mp >= self.model.max_model_len:
            raise ValueError("router.max_prompt_tokens: must be below model.max_model_len")
        return self

    # -- derived ----------------------------------------------------------------------

    @property
    def generating_pool(self) -> PoolConfig:
        return next(p for p in self.pools if p.role is not Role.PREFILL)

    @property
    def prefill_pool(self) -> PoolConfig | None:
        return next((p for p in self.pools if p.role is Role.PREFILL), None)

    @property
    def block_size(self) -> int:
        return self.pools[0].engine.block_size

    def with_transfer_secret(self) -> ClusterConfig:
        """This config with a KV-transfer secret: its own, or a new random one."""
        if self.kv_transfer.secret is not None:
            return self
        secret = SecretStr(secrets.token_hex(MIN_TRANSFER_SECRET_CHARS))
        kv = self.kv_transfer.model_copy(update={"secret": secret})
        return self.model_copy(update={"kv_transfer": kv})

    def required_cpus(self) -> float:
        """Logical CPUs that the router and every pool replica ask Ray for."""
        total = self.router.num_cpus * self.router.replicas
        for p in self.pools:
            total += p.resources_per_rank.get("CPU", 0) * p.world_size * p.replicas
        return total
