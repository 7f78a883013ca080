"""One function turns a validated `ClusterConfig` into the Ray Serve application.

The graph, one Serve application named "pdserve" with the router as its ingress:

    router      (ingress; Serve's gRPC proxy: pdserve.v1.PDServe + grpc.health.v1.Health,
      |          Serve's HTTP proxy: the OpenAI API, /health, /metrics)
      |-> decode pool    DecodeWorker, role decode or colocated
      '-> prefill pool   PrefillWorker, only when the config has one

    prefill replicas --KV via kv_transfer--> decode replicas   (outside Serve)

With the controller enabled (`planner.enabled`) both pools deploy `DualWorker`
instead: every replica serves both roles, and the controller flips them in the routing
table. `pdserve up` starts it as a detached actor (`controller_settings`); an
application built from a Serve config (`build_app(controller=True)`, KubeRay) has it as
a deployment of its own:
      '-> controller     ControllerDeployment, one replica (its handle is bound to
                         the router only so that Serve deploys it; nothing calls it)
    every replica <--> Redis: registry leases, load reports, kv rendezvous, prefix index

Each pool is one deployment with the pool's name and replica count. A replica asks Ray
for its rank's resources; its engine pins torch to the pool's CPU share. A pool with
tp x pp > 1 gives each replica a placement group of one bundle per rank
(`placement_group_bundles`, the pool's placement strategy): the replica itself is rank
0 in bundle 0 and places ranks 1..N-1 in the other bundles. The router
reaches a chosen replica through `router.pinning.PinnedReplicaRouter`, which both pool
deployments use as their Serve request router.

`build_app` also checks the config against the model (context length, KV cache size,
TP/PP geometry), so a config that cannot run fails here, not in a replica.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import SecretStr
from ray import serve
from ray.serve.config import BackpressureConfig, HTTPOptions, RequestRouterConfig, gRPCOptions
from ray.serve.schema import LoggingConfig

from cluster.client.sync import APPLICATION
from cluster.config import ClusterConfig, ConfigError, PoolConfig
from controller.deployment import DEPLOYMENT_NAME as CONTROLLER_DEPLOYMENT
from controller.deployment import ControllerDeployment
from controller.settings import ControllerSettings
from decode_worker.deployment import DecodeWorker
from dual_worker.deployment import DualWorker
from engine.config import EngineConfig, ModelConfig, parse_dtype
from engine.kv_cache import KVCacheLayout
from engine.parallel.layout import ParallelLayout
from kv_transfer.base import Parallelism
from kv_transfer.faults import Fault, FaultKind
from kv_transfer.mapping import KVGeometry
from prefill_worker.deployment import PrefillWorker
from registry import Role
from router.deployment import Router
from router.dispatch import DispatchTimeouts
from router.pinning import ROUTER_CLASS_PATH
from router.settings import PoolSpec, RouterSettings
from router.validation import Limits
from telemetry import TracingSettings
from worker.messages import WorkerSettings

logger = logging.getLogger(__name__)

APP_NAME = APPLICATION  # the name the clients' calls carry
# Ray Serve's own low-latency switches (its "throughput optimized" set, minus direct
# ingress, which would move the proxies' ports): handles talk to replicas over gRPC,
# and user code and handle routers run on the replica's main event loop instead of
# extra threads and loops. Each saves a thread or process hop per call. Serve reads
# them when its processes start, so they are set in the environment before Ray.
LOW_LATENCY_SERVE_ENV = {
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
}
GRPC_SERVICER_FUNCTIONS = [
    "protos.pdserve.v1.pdserve_pb2_grpc.add_PDServeServicer_to_server",
    "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
]
# The engines batch and queue requests themselves; Serve must not cap them at its
# default of 5 in flight per replica.
_WORKER_MAX_ONGOING = 4096
# How often a stopping pool replica checks that its calls are over (Serve's default: 2 s)
_DRAIN_POLL_S = 0.5
_LOGGING = LoggingConfig(enable_access_log=False)
_FULL = BackpressureConfig(status_code=429)  # a full ingress is the router's 429
_PINNED = RequestRouterConfig.model_validate({"request_router_class": ROUTER_CLASS_PATH})


def serve_process_env(config: ClusterConfig) -> dict[str, str]:
    """Environment for the processes of a local Ray that will run this config: the
    low-latency switches, and the gRPC proxy's message limit (Serve's default is 2 GiB)
    cut to the router's request bound, so an oversized message is refused by gRPC
    itself before anything parses it."""
    env = dict(LOW_LATENCY_SERVE_ENV) if config.router.low_latency_serve else {}
    env["RAY_SERVE_GRPC_MAX_MESSAGE_SIZE"] = str(int(config.router.max_request_bytes) + (64 << 10))
    return env


def serve_options(config: ClusterConfig) -> tuple[HTTPOptions, gRPCOptions]:
    """Options for `serve.start`: the proxies' addresses and the gRPC services."""
    http = HTTPOptions(host=config.server.host, port=config.server.http_port)
    grpc = gRPCOptions(
        port=config.server.grpc_port,
        grpc_servicer_functions=list(GRPC_SERVICER_FUNCTIONS),
        enable_reflection=True,
    )
    return http, grpc


def check_against_model(config: ClusterConfig, model_dir: str) -> ModelConfig:
    mc = ModelConfig.from_dir(model_dir)
    if config.model.max_model_len > mc.max_position_embeddings:
        raise ConfigError(
            f"model.max_model_len: {config.model.max_model_len} exceeds the model's "
            f"max_position_embeddings ({mc.max_position_embeddings})"
        )
    geo = KVGeometry(mc.num_layers, mc.num_kv_heads)
    dtype = parse_dtype(config.model.dtype)
    for p in config.pools:
        where = f"pools.{p.name}"
        rank = ParallelLayout(p.tp, p.pp)
        try:  # the model's sharding and the KV transfer's M:N plan
            geo.check(Parallelism(p.tp, p.pp))
            rank.check(mc)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        # kv_cache_bytes is per rank, which holds its share of the layers and KV heads.
        layout = KVCacheLayout.from_budget(
            mc,
            p.engine.block_size,
            p.engine.kv_cache_bytes,
            dtype,
            num_layers=len(rank.layers(mc)),
            num_kv_heads=len(rank.kv_heads(mc)),
        )
        fits = layout.num_blocks * layout.block_size
        if fits < config.model.max_model_len:
            need = -(-config.model.max_model_len // layout.block_size) * layout.block_bytes
            raise ConfigError(
                f"{where}.engine.kv_cache_bytes: holds {fits} tokens, fewer than "
                f"model.max_model_len ({config.model.max_model_len}); need at least {need} bytes"
            )
    return mc


def _reveal(secret: SecretStr | None) -> str | None:
    return secret.get_secret_value() if secret is not None else None


def tracing_settings(config: ClusterConfig) -> TracingSettings:
    t = config.tracing
    return TracingSettings(
        enabled=t.enabled,
        sample_ratio=t.sample_ratio,
        otlp_endpoint=t.otlp_endpoint,
        max_requests=t.max_requests,
        max_spans_per_request=t.max_spans_per_request,
        retention_s=t.retention_s,
    )


def worker_settings(
    config: ClusterConfig, pool: PoolConfig, model_dir: str, redis_url: str
) -> WorkerSettings:
    e = pool.engine
    return WorkerSettings(
        cluster=config.name,
        pool=pool.name,
        role=pool.role,
        engine=EngineConfig(
            model=model_dir,
            dtype=config.model.dtype,
            device=pool.device,
            block_size=e.block_size,
            kv_cache_bytes=int(e.kv_cache_bytes),
            max_num_batched_tokens=e.max_num_batched_tokens,
            max_num_seqs=e.max_num_seqs,
            max_model_len=config.model.max_model_len,
            num_threads=pool.num_threads,
            enable_prefix_caching=e.enable_prefix_caching,
            cpu_linear=e.cpu_linear,
            cpu_linear_min_gain=e.cpu_linear_min_gain,
            tp=pool.tp,
            pp=pool.pp,
            max_stop_strings=config.router.max_stop_strings,
            max_logprobs=config.router.max_logprobs,
        ),
        redis_url=redis_url,
        lease_ttl_s=config.redis.lease_ttl_s,
        load_report_interval_s=config.redis.load_report_interval_s,
        transport=config.kv_transfer.transport,
        transfer_host=config.kv_transfer.host,
        transfer_timeout_s=config.kv_transfer.timeout_s,
        rank_resources=dict(pool.resources_per_rank),
        rank_timeout_s=pool.rank_timeout_s,
        rank_start_timeout_s=pool.rank_start_timeout_s,
        faults=tuple(
            Fault(FaultKind(f.kind), f.after, f.times, f.delay_s) for f in config.kv_transfer.faults
        )
        if pool.role is Role.PREFILL
        else (),
        transfer_secret=_reveal(config.kv_transfer.secret),
        tracing=tracing_settings(config),
        switchable=config.planner.enabled,
    )


def controller_settings(config: ClusterConfig, redis_url: str) -> ControllerSettings:
    prefill = config.prefill_pool
    if prefill is None:
        raise ConfigError("planner.enabled: the controller needs a prefill pool")
    return ControllerSettings(
        cluster=config.name,
        app_name=APP_NAME,
        redis_url=redis_url,
        lease_ttl_s=config.redis.lease_ttl_s,
        prefill_pool=prefill.name,
        decode_pool=config.generating_pool.name,
        replicas={p.name: p.replicas for p in config.pools},
        initial_threshold=config.router.disaggregation_threshold,
        planner=config.planner,
    )


def router_settings(config: ClusterConfig, model_dir: str, redis_url: str) -> RouterSettings:
    r = config.router
    max_len = config.model.max_model_len
    prompt_tokens = r.max_prompt_tokens or max_len - 1
    s = config.server
    return RouterSettings(
        cluster=config.name,
        served_model=config.model.served_id,
        model_dir=model_dir,
        max_model_len=max_len,
        block_size=config.block_size,
        redis_url=redis_url,
        lease_ttl_s=config.redis.lease_ttl_s,
        pools=tuple(PoolSpec(p.name, p.role, p.replicas, p.tp, p.pp) for p in config.pools),
        disaggregation_threshold=r.disaggregation_threshold,
        limits=Limits(
            max_model_len=max_len,
            max_prompt_tokens=prompt_tokens,
            max_prompt_chars=min(
                int(r.max_request_bytes), r.prompt_chars_per_token * prompt_tokens
            ),
            max_messages=min(r.max_messages, prompt_tokens),
            max_stop_strings=r.max_stop_strings,
            max_logprobs=r.max_logprobs,
        ),
        timeouts=DispatchTimeouts(
            dispatch_s=r.dispatch_timeout_s,
            stream_idle_s=max(r.stream_idle_timeout_s, config.kv_transfer.timeout_s + 15.0),
            prefill_s=r.prefill_timeout_s,
            transfer_s=config.kv_transfer.timeout_s,
            drain_s=config.generating_pool.graceful_shutdown_timeout_s / 2,
        ),
        max_inflight_requests=r.max_inflight_requests,
        max_request_bytes=int(r.max_request_bytes),
        view_refresh_interval_s=r.view_refresh_interval_s,
        default_chat_max_tokens=r.default_chat_max_tokens,
        max_dispatch_attempts=r.max_dispatch_attempts,
        max_migrations=r.max_migrations,
        probe_timeout_s=r.probe_timeout_s,
        tokenizer_threads=r.tokenizer_threads,
        max_health_watches=r.max_health_watches,
        health_watch_max_s=r.health_watch_max_s,
        slo_ttft_s=r.slo_ttft_s,
        slo_tpot_s=r.slo_tpot_s,
        grpc_bearer_token=s.grpc_bearer_token.get_secret_value() if s.grpc_bearer_token else None,
        http_api_key=s.api_key.get_secret_value() if s.api_key else None,
        tracing=tracing_settings(config),
    )


def _pool_deployment(
    config: ClusterConfig, pool: PoolConfig, model_dir: str, redis_url: str
) -> Any:
    res = dict(pool.resources_per_rank)
    actor: dict[str, Any] = {"num_cpus": res.pop("CPU", 0.0), "num_gpus": res.pop("GPU", 0.0)}
    if res:
        actor["resources"] = res
    placement: dict[str, Any] = {}
    if pool.world_size > 1:
        placement = {
            "placement_group_bundles": [dict(pool.resources_per_rank)] * pool.world_size,
            "placement_group_strategy": pool.placement_strategy,
        }
    cls: type = PrefillWorker if pool.role is Role.PREFILL else DecodeWorker
    if config.planner.enabled:
        cls = DualWorker
    deployment: Any = serve.deployment(cls)
    deployment = deployment.options(
        name=pool.name,
        num_replicas=pool.replicas,
        ray_actor_options=actor,
        **placement,
        max_ongoing_requests=_WORKER_MAX_ONGOING,
        # A router replica holds at most max_inflight_requests, so none queues more.
        max_queued_requests=config.router.max_inflight_requests,
        request_router_config=_PINNED,
        health_check_period_s=10.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=pool.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=_DRAIN_POLL_S,
        logging_config=_LOGGING,
    )
    return deployment.bind(worker_settings(config, pool, model_dir, redis_url))


def _controller_deployment(config: ClusterConfig, redis_url: str) -> Any:
    if CONTROLLER_DEPLOYMENT in {p.name for p in config.pools}:
        raise ConfigError(
            f"pools: with planner.enabled the controller is the application's deployment "
            f"{CONTROLLER_DEPLOYMENT!r}; rename that pool"
        )
    deployment: Any = serve.deployment(ControllerDeployment)
    deployment = deployment.options(
        name=CONTROLLER_DEPLOYMENT,
        num_replicas=1,
        ray_actor_options={"num_cpus": 0},
        max_ongoing_requests=8,
        health_check_period_s=10.0,
        health_check_timeout_s=30.0,
        graceful_shutdown_timeout_s=20.0,
        logging_config=_LOGGING,
    )
    return deployment.bind(controller_settings(config, redis_url))


def build_app(
    config: ClusterConfig, *, model_dir: str, redis_url: str, controller: bool = False
) -> Any:
    """The Serve application for `config` (a `serve.Application`).

    `model_dir` is the model as an HF-format directory (`engine.model_source.
    resolve_model` makes one from any source); `redis_url` the cluster's Redis. Every
    pool gets the config's KV-transfer secret in its settings (the deployments' init
    args), or one generated here for all of them; it never goes through Redis.
    With `controller` and `planner.enabled` the application includes the controller
    deployment (for a cluster deployed from a Serve config; `pdserve up` starts the
    controller as a detached actor instead).
    """
    check_against_model(config, model_dir)
    if config.kv_transfer.secret is None:
        logger.info("kv_transfer.secret unset: a new one seals this application's KV channels")
        config = config.with_transfer_secret()
    decode = _pool_deployment(config, config.generating_pool, model_dir, redis_url)
    prefill_pool = config.prefill_pool
    prefill = _pool_deployment(config, prefill_pool, model_dir, redis_url) if prefill_pool else None
    r = config.router
    router: Any = serve.deployment(Router)
    router = router.options(
        name="router",
        num_replicas=r.replicas,
        ray_actor_options={"num_cpus": r.num_cpus},
        max_ongoing_requests=r.max_inflight_requests + r.max_health_watches + 64,  # status
        max_queued_requests=r.max_queued_requests,
        backpressure_config=_FULL,
        health_check_period_s=10.0,
        graceful_shutdown_timeout_s=10.0,
        logging_config=_LOGGING,
    )
    settings = router_settings(config, model_dir, redis_url)
    if controller and config.planner.enabled:
        ctl = _controller_deployment(config, redis_url)
        return router.bind(settings, decode, prefill, controller=ctl)
    return router.bind(settings, decode, prefill)
