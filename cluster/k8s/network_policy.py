"""The release's NetworkPolicy: who may open a connection to its pods.

One policy selects every pod of the release (the Ray pods and the in-cluster Redis,
by `app.kubernetes.io/instance`) and admits, for ingress:

* from pods of the same release: everything (GCS, object transfers, KV transfer's
  control and data ports, Redis, the router's calls to the pools);
* from anywhere: the Services' ports only, gRPC (server.grpc_port) and HTTP
  (server.http_port); who may reach the Services at all is the Service type's matter;
* from the KubeRay operator's pods (kubernetes.network_policy): the dashboard, where
  it submits the Serve config, and the dashboard agent;
* with a PodMonitor (kubernetes.monitoring), from the Prometheus pods: the Ray pods'
  metrics export.

Everything else from outside the release is dropped where the cluster's network
plugin enforces NetworkPolicies (kubelet probes come from the node and are allowed by
common plugins). Egress is not restricted.
"""

from __future__ import annotations

from cluster.config import ClusterConfig
from cluster.k8s.pods import AGENT_PORT, DASHBOARD_PORT, METRICS_PORT, Manifest, labels


def _tcp(*ports: int) -> list[Manifest]:
    return [{"protocol": "TCP", "port": port} for port in ports]


def network_policy(config: ClusterConfig, name: str) -> Manifest:
    k = config.kubernetes
    release = {"app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": name}
    operator: Manifest = {"podSelector": {"matchLabels": dict(k.network_policy.operator_labels)}}
    ns = k.network_policy.operator_namespace
    operator["namespaceSelector"] = (
        {"matchLabels": {"kubernetes.io/metadata.name": ns}} if ns is not None else {}
    )
    s = config.server
    ingress: list[Manifest] = [
        {"from": [{"podSelector": {"matchLabels": release}}]},
        {"ports": _tcp(s.grpc_port, s.http_port)},
        {"from": [operator], "ports": _tcp(DASHBOARD_PORT, AGENT_PORT)},
    ]
    m = k.monitoring
    if m.pod_monitor:
        prometheus: Manifest = {"podSelector": {"matchLabels": dict(m.prometheus_labels)}}
        prometheus["namespaceSelector"] = (
            {"matchLabels": {"kubernetes.io/metadata.name": m.prometheus_namespace}}
            if m.prometheus_namespace is not None
            else {}
        )
        ingress.append({"from": [prometheus], "ports": _tcp(METRICS_PORT)})
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": f"{name}-ingress",
            "namespace": k.namespace,
            "labels": labels(name, "network-policy"),
        },
        "spec": {
            "podSelector": {"matchLabels": release},
            "policyTypes": ["Ingress"],
            "ingress": ingress,
        },
    }
