"""In-cluster Redis servers: a single-replica StatefulSet plus a ClusterIP Service.

Up to two are rendered: `<name>-redis`, the project's Redis (unless
kubernetes.redis.mode is external), which by default also holds the GCS fault
tolerance state, and `<name>-gcs-redis` when gcs_fault_tolerance.redis is
`separate`. The password comes from a Secret (`requirepass` via the container's
environment); with `storage` the data lives on a PersistentVolumeClaim with
append-only persistence, otherwise in an emptyDir. `maxmemory` is 3/4 of the
container's memory with `noeviction`: neither the registry nor the GCS tolerate
silently evicted keys, so a full Redis answers errors instead.
"""

from __future__ import annotations

from cluster.config import ClusterConfig
from cluster.k8s.pods import (
    REDIS_PORT,
    Manifest,
    labels,
    quantity_bytes,
    quantity_cpus,
    redis_password_ref,
    secret_env,
)
from cluster.k8s.settings import RedisServer

_PASSWORD_ENV = "REDIS_PASSWORD"


def _statefulset(server: RedisServer, service: str, name: str, namespace: str) -> Manifest:
    lab = labels(name, service.removeprefix(f"{name}-"))
    password = redis_password_ref(name, server.password, service.removeprefix(f"{name}-"))
    persistent = server.storage is not None
    args = [
        "--requirepass",
        f"$({_PASSWORD_ENV})",
        "--maxmemory",
        str(int(server.memory) * 3 // 4),
        "--maxmemory-policy",
        "noeviction",
        "--appendonly",
        "yes" if persistent else "no",
        "--save",
        "",
    ]
    resources = {"cpu": quantity_cpus(server.cpu), "memory": quantity_bytes(int(server.memory))}
    ping = f'redis-cli -a "${_PASSWORD_ENV}" --no-auth-warning ping | grep -q PONG'
    container: Manifest = {
        "name": "redis",
        "image": server.image,
        "args": args,
        "env": [secret_env(_PASSWORD_ENV, password)],
        "ports": [{"name": "redis", "containerPort": REDIS_PORT}],
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "readinessProbe": {
            "exec": {"command": ["sh", "-c", ping]},
            "periodSeconds": 5,
            "timeoutSeconds": 2,
        },
        "livenessProbe": {
            "tcpSocket": {"port": REDIS_PORT},
            "initialDelaySeconds": 10,
            "periodSeconds": 10,
        },
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    }
    spec: Manifest = {
        "serviceName": service,
        "replicas": 1,
        "selector": {"matchLabels": lab},
        "template": {"metadata": {"labels": lab}, "spec": {"containers": [container]}},
    }
    if persistent:
        assert server.storage is not None
        claim: Manifest = {
            "accessModes": ["ReadWriteOnce"],
            "resources": {"requests": {"storage": quantity_bytes(int(server.storage))}},
        }
        if server.storage_class is not None:
            claim["storageClassName"] = server.storage_class
        spec["volumeClaimTemplates"] = [{"metadata": {"name": "data"}, "spec": claim}]
    else:
        spec["template"]["spec"]["volumes"] = [{"name": "data", "emptyDir": {}}]
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": service, "namespace": namespace, "labels": lab},
        "spec": spec,
    }


def _service(service: str, name: str, namespace: str) -> Manifest:
    lab = labels(name, service.removeprefix(f"{name}-"))
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": service, "namespace": namespace, "labels": lab},
        "spec": {
            "type": "ClusterIP",
            "selector": lab,
            "ports": [{"name": "redis", "port": REDIS_PORT, "targetPort": "redis"}],
        },
    }


def redis_servers(config: ClusterConfig, name: str) -> list[Manifest]:
    """The in-cluster Redis servers' StatefulSets and Services (maybe none)."""
    k = config.kubernetes
    servers: list[tuple[RedisServer, str]] = []
    if k.redis.mode == "in_cluster":
        servers.append((k.redis.server, f"{name}-redis"))
    if k.gcs_fault_tolerance.redis == "separate":
        servers.append((k.gcs_fault_tolerance.server, f"{name}-gcs-redis"))
    out: list[Manifest] = []
    for server, service in servers:
        out += [
            _statefulset(server, service, name, k.namespace),
            _service(service, name, k.namespace),
        ]
    return out
