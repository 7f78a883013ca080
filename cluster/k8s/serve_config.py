"""The config as the Ray pods run it, and the RayService's serveConfigV2.

`pod_config(config)` is the user's config with what a pod network requires, and
nothing else, changed:

* server.host = 0.0.0.0: the Serve HTTP proxy must be reachable from the Services
  (a pod's loopback is not, and pod IPs are not known in advance); what is exposed
  is decided by the Services' type (ClusterIP by default: in-cluster only);
* kv_transfer.host = auto: each replica binds and advertises its own pod IP;
* every pool's ranks also ask for one unit of `pdserve_pool_<name>`, the resource
  that pins them to their own worker group (`cluster.k8s.groups`);
* redis.url = None: the URL carries credentials, so the pods read it from a Secret;
* ray.address = None: the application is built inside the Ray cluster it runs on.

`serve_config_v2(config)` is the Serve config KubeRay submits to the head: the
proxies' options from `cluster.builder.serve_options`, and one application built in
the cluster by `cluster.serve_entry.app` from the pod config. With `planner.enabled`
that application includes the controller deployment (`controller.deployment`), and
with `planner.scaling` it is deployed with `external_scaler_enabled`, which lets the
controller set the pools' replica counts. KubeRay submits serveConfigV2 again only when
it changes, so it does not undo them; a new serveConfigV2 deploys the config's counts.
"""

from __future__ import annotations

from typing import Any

import yaml

from cluster.builder import APP_NAME, serve_options, serve_process_env
from cluster.config import ClusterConfig
from cluster.k8s.groups import pool_resource
from cluster.serve_entry import IMPORT_PATH, entry_args


def pod_config(config: ClusterConfig) -> ClusterConfig:
    pools = [
        p.model_copy(
            update={"resources_per_rank": {**p.resources_per_rank, pool_resource(p.name): 1.0}}
        )
        for p in config.pools
    ]
    return config.model_copy(
        update={
            "server": config.server.model_copy(update={"host": "0.0.0.0"}),
            "kv_transfer": config.kv_transfer.model_copy(update={"host": "auto"}),
            "redis": config.redis.model_copy(update={"url": None}),
            "ray": config.ray.model_copy(update={"address": None}),
            "pools": pools,
        }
    )


def serve_config_v2(config: ClusterConfig) -> str:
    """serveConfigV2 (a YAML string) for the pod config `config`."""
    http, grpc = serve_options(config)
    application: dict[str, Any] = {
        "name": APP_NAME,
        "route_prefix": "/",
        "import_path": IMPORT_PATH,
        "args": entry_args(config),
    }
    if config.planner.enabled and config.planner.scaling:
        application["external_scaler_enabled"] = True
    doc: dict[str, Any] = {
        "proxy_location": "EveryNode",
        "http_options": {"host": http.host, "port": http.port},
        "grpc_options": {
            "port": grpc.port,
            "grpc_servicer_functions": list(grpc.grpc_servicer_functions),
            "enable_reflection": grpc.enable_reflection,
        },
        "applications": [application],
    }
    return yaml.safe_dump(doc, sort_keys=True, default_flow_style=False)


def serve_env(config: ClusterConfig) -> dict[str, str]:
    """Environment Serve's processes read at start, on every Ray pod."""
    return serve_process_env(config)
