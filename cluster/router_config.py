"""The cluster config's front-door sections: the router replicas (`RouterConfig`: limits,
timeouts, dispatch) and the API server they serve (`ServerConfig`: bind address,
ports, credentials). `ClusterConfig` (cluster/config.py) embeds both and checks the
rules that span sections (distinct ports, the prompt limit below the context length).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ByteSize, ConfigDict, Field, SecretStr, model_validator

Port = Annotated[int, Field(ge=1, le=65535)]
_STRICT = ConfigDict(extra="forbid")


class RouterConfig(BaseModel):
    model_config = _STRICT

    replicas: int = Field(default=1, ge=1, le=64, description="Router replicas.")
    num_cpus: float = Field(default=1.0, ge=0, description="Ray CPUs per router replica.")
    disaggregation_threshold: int = Field(
        default=64,
        ge=0,
        description="Prompts with fewer uncached tokens than this are prefilled by the "
        "decode instance itself; longer ones by the prefill pool.",
    )
    max_inflight_requests: int = Field(
        default=256,
        ge=1,
        description="Requests one router replica holds; beyond: RESOURCE_EXHAUSTED.",
    )
    max_queued_requests: int = Field(
        default=512,
        ge=1,
        description="Requests Serve's proxy queues for the router replicas when every one "
        "is busy; beyond: HTTP 429 or gRPC RESOURCE_EXHAUSTED. Pools queue at most "
        "max_inflight_requests per router replica.",
    )
    max_health_watches: int = Field(
        default=32,
        ge=0,
        le=4096,
        description="Concurrent gRPC health Watch streams per router replica; beyond: "
        "RESOURCE_EXHAUSTED.",
    )
    health_watch_max_s: float = Field(
        default=300.0,
        gt=0,
        le=86400,
        description="Longest life of one health Watch stream; the client watches again.",
    )
    max_request_bytes: ByteSize = Field(
        default=ByteSize(1 << 20), description="Largest gRPC message or HTTP body accepted."
    )
    max_prompt_tokens: int | None = Field(
        default=None, ge=1, description="Longest prompt; default: max_model_len - 1."
    )
    prompt_chars_per_token: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="Bound on prompt text (or all chat messages) in characters, checked "
        "before tokenizing: this many per allowed prompt token (never above "
        "max_request_bytes).",
    )
    max_messages: int = Field(
        default=256,
        ge=1,
        le=4096,
        description="Chat messages per request (never above the prompt's token bound).",
    )
    tokenizer_threads: int = Field(
        default=2,
        ge=1,
        le=32,
        description="Threads per router replica that tokenize prompts, off its event loop.",
    )
    max_stop_strings: int = Field(default=16, ge=0, le=64, description="Stop strings per request.")
    max_logprobs: int = Field(default=20, ge=0, le=100, description="Top logprobs per token.")
    default_chat_max_tokens: int = Field(
        default=256, ge=1, description="max_tokens of a chat completion that sets none."
    )
    dispatch_timeout_s: float = Field(
        default=30.0, gt=0, description="Wait for a pool's first answer."
    )
    max_dispatch_attempts: int = Field(
        default=2,
        ge=1,
        le=8,
        description="Tries of a request whose decode instance fails before its first token, "
        "each on another instance (1: no retry).",
    )
    max_migrations: int = Field(
        default=2,
        ge=0,
        le=8,
        description="Times a stream whose decode instance fails after tokens were sent "
        "moves to another one, which computes the prompt and the tokens so far and goes on "
        "(0: the error ends the stream).",
    )
    probe_timeout_s: float = Field(
        default=1.0,
        gt=0,
        description="Longest probe of an instance excluded after a failure, before it "
        "returns to routing.",
    )
    stream_idle_timeout_s: float = Field(
        default=120.0, gt=0, description="Longest gap between two chunks of one stream."
    )
    prefill_timeout_s: float = Field(default=60.0, gt=0, description="Longest remote prefill.")
    low_latency_serve: bool = Field(
        default=True,
        description="Start a local Ray with Ray Serve's low-latency settings (handles over "
        "gRPC, user code on the replica's event loop). A Ray cluster joined with "
        "ray.address keeps the settings it was started with.",
    )
    view_refresh_interval_s: float = Field(
        default=0.2, gt=0, le=5.0, description="How often the router re-reads registry and loads."
    )
    slo_ttft_s: float = Field(
        default=2.0,
        gt=0,
        description="Goodput: a finished request meets the SLO with its TTFT within this "
        "and its mean TPOT within slo_tpot_s (metric pdserve_slo_requests).",
    )
    slo_tpot_s: float = Field(
        default=0.2, gt=0, description="Goodput: the mean time per output token it allows."
    )


class ServerConfig(BaseModel):
    model_config = _STRICT

    host: str = Field(
        default="127.0.0.1", description="HTTP bind address; loopback unless set wider on purpose."
    )
    http_port: Port = Field(default=8000, description="OpenAI-compatible HTTP API port.")
    grpc_port: Port = Field(
        default=9000,
        description="gRPC API port. Ray Serve 2.60's gRPC proxy listens on every interface "
        "([::]) whatever `host` says; set grpc_bearer_token, or firewall the port.",
    )
    api_key: SecretStr | None = Field(
        default=None, description="HTTP API key (Bearer); None: open."
    )
    grpc_bearer_token: SecretStr | None = Field(
        default=None, description="gRPC bearer token (authorization metadata); None: open."
    )
    grpc_tls_cert_file: Path | None = Field(default=None, description="gRPC TLS certificate.")
    grpc_tls_key_file: Path | None = Field(default=None, description="gRPC TLS private key.")

    @model_validator(mode="after")
    def _tls(self) -> ServerConfig:
        if self.grpc_tls_cert_file is not None or self.grpc_tls_key_file is not None:
            raise ValueError(
                "grpc_tls_cert_file/grpc_tls_key_file: Ray Serve 2.60's gRPC proxy only "
                "serves plaintext; terminate TLS in front of it (a load balancer or a "
                "sidecar) and keep grpc_bearer_token set"
            )
        return self
