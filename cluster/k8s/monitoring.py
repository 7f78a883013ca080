"""The release's PodMonitor: Prometheus (prometheus-operator) scrapes the metrics
export of every Ray pod of the release.

Each Ray pod runs a metrics agent that exports the metrics of every process on the
pod (KubeRay starts Ray with its metrics export on port 8080, the pods' `metrics`
port): router replicas, pool replicas and their rank actors, labelled by pool,
replica and rank (worker.metric_set). One PodMonitor selecting the release's Ray pods
by label therefore covers the whole cluster; deploy/grafana's dashboard reads it.
The NetworkPolicy admits these scrapes (cluster.k8s.network_policy).
"""

from __future__ import annotations

from cluster.config import ClusterConfig
from cluster.k8s.pods import Manifest, labels

METRICS_PORT_NAME = "metrics"  # the container port cluster.k8s.pods names


def pod_monitor(config: ClusterConfig, name: str) -> Manifest:
    k = config.kubernetes
    m = k.monitoring
    ray_pods = {"app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": name}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": {
            "name": f"{name}-metrics",
            "namespace": k.namespace,
            "labels": {**labels(name, "metrics"), **m.labels},
        },
        "spec": {
            "selector": {
                "matchLabels": ray_pods,
                # the Ray pods (the in-cluster Redis has the release's labels too)
                "matchExpressions": [{"key": "ray.io/node-type", "operator": "Exists"}],
            },
            "namespaceSelector": {"matchNames": [k.namespace]},
            "podMetricsEndpoints": [
                {
                    "port": METRICS_PORT_NAME,
                    "path": "/metrics",
                    "interval": f"{m.interval_s}s",
                }
            ],
        },
    }
