"""The client-facing Services and the Namespace.

`<name>-grpc` (server.grpc_port, 9000 by default) and `<name>-http`
(server.http_port, 8000) select the Ray pods of this RayService whose Serve proxy is
ready: KubeRay labels every worker pod `ray.io/serve: "true"` and lets its readiness
probe (the proxy's /-/healthz) gate it, and labels the head by probing its proxy
itself. During a RayService upgrade both RayClusters' ready pods are selected until
the old one is deleted; each routes only within itself (`PDSERVE_REGISTRY_SCOPE`).
KubeRay also creates `<name>-serve-svc` (HTTP only) on its own.
"""

from __future__ import annotations

from cluster.config import ClusterConfig
from cluster.k8s.pods import Manifest, labels


def _service(
    config: ClusterConfig, name: str, suffix: str, port: int, app_protocol: str
) -> Manifest:
    k = config.kubernetes
    selector = {
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/name": "pdserve",
        "ray.io/serve": "true",
    }
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {
            "name": f"{name}-{suffix}",
            "namespace": k.namespace,
            "labels": labels(name, suffix),
        },
        "spec": {
            "type": k.service_type,
            "selector": selector,
            "ports": [
                {
                    "name": suffix,
                    "port": port,
                    "targetPort": port,
                    "protocol": "TCP",
                    "appProtocol": app_protocol,
                }
            ],
        },
    }


def client_services(config: ClusterConfig, name: str) -> list[Manifest]:
    s = config.server
    return [
        _service(config, name, "grpc", s.grpc_port, "kubernetes.io/h2c"),
        _service(config, name, "http", s.http_port, "http"),
    ]


def namespace(config: ClusterConfig) -> Manifest:
    ns = config.kubernetes.namespace
    return {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns, "labels": {"app.kubernetes.io/name": "pdserve"}},
    }
