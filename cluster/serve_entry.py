"""The Serve application builder that runs inside a Ray cluster.

KubeRay's serveConfigV2 (rendered by `pdserve render k8s`) names `IMPORT_PATH` as the
application's import path, with `entry_args(config)` as its args. Serve's controller
imports this module in the cluster and calls `app(args)` once per deploy of the config;
it returns the same application `pdserve up` deploys (`cluster.builder.build_app`),
with, when `planner.enabled`, the controller as a deployment of it: `pdserve up`
starts a detached actor, but a cluster deployed from a Serve config has no step of its
own to start one, and as a deployment Serve keeps exactly one replica of it running
(replaced when it dies or fails its health check), deletes it with the application,
and upgrades it with the rest of the config.

The args hold the cluster config without secrets. What must not be written into a
manifest comes from the Ray pods' environment, filled from Secrets:

    PDSERVE_REDIS_URL          the project's Redis URL, credentials included (required
                               unless the config has redis.url)
    PDSERVE_HTTP_API_KEY       the HTTP API key (optional)
    PDSERVE_GRPC_BEARER_TOKEN  the gRPC bearer token (optional)
    PDSERVE_KV_TRANSFER_SECRET the cluster secret that seals the KV control channels'
                               HELLOs (without it, each build generates its own)
    PDSERVE_REGISTRY_SCOPE     the RayCluster's name (optional): registry keys are then
                               namespaced by "<cluster name>.<scope>", so the old and
                               new RayCluster of a RayService upgrade, which share the
                               Redis, never route to each other's replicas

The model is resolved here, in the cluster, where the image (a known name converted at
image build time) or the model volume has it at the same path on every node.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from pydantic import SecretStr, ValidationError

from cluster.config import ClusterConfig, ConfigError

logger = logging.getLogger(__name__)

IMPORT_PATH = "cluster.serve_entry:app"
REDIS_URL_ENV = "PDSERVE_REDIS_URL"
HTTP_API_KEY_ENV = "PDSERVE_HTTP_API_KEY"
GRPC_TOKEN_ENV = "PDSERVE_GRPC_BEARER_TOKEN"
SCOPE_ENV = "PDSERVE_REGISTRY_SCOPE"
KV_SECRET_ENV = "PDSERVE_KV_TRANSFER_SECRET"


def entry_args(config: ClusterConfig) -> dict[str, Any]:
    """The args of `app` for `config`: the config as JSON, secrets and the
    `kubernetes` section left out, fields at their defaults omitted."""
    data = config.model_dump(
        mode="json",
        exclude_defaults=True,
        exclude={
            "kubernetes": True,
            "server": {"api_key", "grpc_bearer_token"},
            "kv_transfer": {"secret"},
        },
    )
    return {"config": data}


def config_from_args(args: dict[str, Any], env: dict[str, str] | None = None) -> ClusterConfig:
    """The config `app` deploys: the args' config plus the secrets and scope from the
    environment."""
    environ = dict(os.environ) if env is None else env
    raw = args.get("config")
    if not isinstance(raw, dict):
        raise ConfigError("serve entry: args.config must be the cluster config mapping")
    try:
        config = ClusterConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(f"serve entry: invalid cluster config in args: {e}") from None
    server_update: dict[str, Any] = {}
    if environ.get(HTTP_API_KEY_ENV):
        server_update["api_key"] = SecretStr(environ[HTTP_API_KEY_ENV])
    if environ.get(GRPC_TOKEN_ENV):
        server_update["grpc_bearer_token"] = SecretStr(environ[GRPC_TOKEN_ENV])
    update: dict[str, Any] = {"server": config.server.model_copy(update=server_update)}
    if environ.get(KV_SECRET_ENV):
        try:
            kv = config.kv_transfer.model_validate(
                {**config.kv_transfer.model_dump(), "secret": environ[KV_SECRET_ENV]}
            )
        except ValidationError as e:
            raise ConfigError(f"serve entry: {KV_SECRET_ENV}: {e.errors()[0]['msg']}") from None
        update["kv_transfer"] = kv
    if environ.get(REDIS_URL_ENV):
        update["redis"] = config.redis.model_copy(update={"url": environ[REDIS_URL_ENV]})
    elif config.redis.url is None:
        raise ConfigError(f"serve entry: set {REDIS_URL_ENV} or redis.url (no embedded Redis here)")
    scope = environ.get(SCOPE_ENV)
    if scope:
        update["name"] = f"{config.name}.{scope}"[:128]
    return config.model_copy(update=update)


def app(args: dict[str, Any]) -> Any:
    """Serve's application builder: the `serve.Application` for the args' config."""
    from cluster.builder import build_app
    from engine.model_source import resolve_model

    config = config_from_args(args)
    model_dir = str(resolve_model(config.model.source))
    assert config.redis.url is not None  # config_from_args guarantees it
    logger.info(
        "building cluster %s: model %s, pools %s",
        config.name,
        model_dir,
        ", ".join(f"{p.name}({p.role.value}) x{p.replicas}" for p in config.pools),
    )
    return build_app(config, model_dir=model_dir, redis_url=config.redis.url, controller=True)
