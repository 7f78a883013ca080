"""In-cluster Redis servers: a single-replica StatefulSet plus a ClusterIP Service.

Up to two are rendered: `<name>-redis`, the project's Redis (unless
kubernetes.redis.mode is external), which by default also holds the GCS fault
tolerance state, and `<name>-gcs-redis` when gcs_fault_tolerance.redis is
`separate`. The password comes from a Secret through the container's environment: the
server reads its config, `requirepass` included, on stdin from the shell's builtin
printf, and the readiness probe's redis-cli reads REDISCLI_AUTH, so the password is
in no command line. With `tls_secret` the server speaks TLS only (clients use
rediss:// and the Secret's ca.crt). With `storage` the data lives on a
PersistentVolumeClaim with append-only persistence, otherwise in an emptyDir.
`maxmemory` is 3/4 of the container's memory with `noeviction`: neither the registry
nor the GCS tolerate silently evicted keys, so a full Redis answers errors instead.
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
TLS_DIR = "/etc/redis-tls"
# The server reads its config on stdin (`redis-server -`), written by the shell's
# builtin printf: the password expands there, in no process's argv.
_START = "printf '%s\\n' {lines} | exec redis-server -"
_PING = "redis-cli {tls}ping | grep -q PONG"  # password from REDISCLI_AUTH


def _config_lines(server: RedisServer) -> list[str]:
    persistent = server.storage is not None
    lines = [
        f'"requirepass \\"${_PASSWORD_ENV}\\""',
        f"'maxmemory {int(server.memory) * 3 // 4}'",
        "'maxmemory-policy noeviction'",
        f"'appendonly {'yes' if persistent else 'no'}'",
        "'save \"\"'",
        "'dir /data'",
    ]
    if server.tls_secret is not None:
        lines += [
            "'port 0'",
            f"'tls-port {REDIS_PORT}'",
            f"'tls-cert-file {TLS_DIR}/tls.crt'",
            f"'tls-key-file {TLS_DIR}/tls.key'",
            f"'tls-ca-cert-file {TLS_DIR}/ca.crt'",
            "'tls-auth-clients no'",  # clients prove themselves with the password
        ]
    else:
        lines.append(f"'port {REDIS_PORT}'")
    return lines


def _statefulset(server: RedisServer, service: str, name: str, namespace: str) -> Manifest:
    lab = labels(name, service.removeprefix(f"{name}-"))
    password = redis_password_ref(name, server.password, service.removeprefix(f"{name}-"))
    persistent = server.storage is not None
    tls = server.tls_secret is not None
    resources = {"cpu": quantity_cpus(server.cpu), "memory": quantity_bytes(int(server.memory))}
    ping = _PING.format(tls=f"--tls --cacert {TLS_DIR}/ca.crt " if tls else "")
    mounts: list[Manifest] = [{"name": "data", "mountPath": "/data"}]
    if tls:
        mounts.append({"name": "tls", "mountPath": TLS_DIR, "readOnly": True})
    container: Manifest = {
        "name": "redis",
        "image": server.image,
        "command": ["sh", "-c", _START.format(lines=" ".join(_config_lines(server)))],
        "env": [secret_env(_PASSWORD_ENV, password), secret_env("REDISCLI_AUTH", password)],
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
        "volumeMounts": mounts,
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
    volumes: list[Manifest] = [] if persistent else [{"name": "data", "emptyDir": {}}]
    if tls:
        volumes.append(
            {"name": "tls", "secret": {"secretName": server.tls_secret, "defaultMode": 0o400}}
        )
    if volumes:
        spec["template"]["spec"]["volumes"] = volumes
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
