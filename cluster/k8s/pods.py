"""Pod templates of the Ray node groups: container, environment, probes, volumes.

Every Ray container gets, in this order (later entries may refer to earlier ones):

1. Serve's process settings (`cluster.builder.serve_process_env`);
2. NCCL/Gloo settings (`NcclSettings`; documented in deploy/README.md);
3. PDSERVE_REGISTRY_SCOPE from the pod's `ray.io/cluster` label;
4. the project's Redis URL (composed from the in-cluster Redis password Secret, or an
   external URL Secret), the API secrets and the KV-transfer secret (Secret
   `<name>-kv-transfer` unless configured), as `cluster.serve_entry` reads them;
5. on the head only, its pod IP (the dashboard binds there, not on every interface)
   and GCS fault tolerance: RAY_REDIS_ADDRESS and REDIS_PASSWORD.

With the project Redis on TLS, every Ray pod mounts the Secret's ca.crt and the URL is
rediss:// with certificate checks.

Probes use Ray's own health endpoints over HTTP: the dashboard agent's `/api/healthz`
(raylet, plus GCS on the head) for liveness everywhere and readiness on the head;
the Serve proxy's `/-/healthz` for worker readiness, which is what puts a worker pod
behind the Services (KubeRay checks the head's proxy itself and labels the head).
"""

from __future__ import annotations

from typing import Any

from cluster.config import ClusterConfig
from cluster.k8s.groups import GroupPlan
from cluster.k8s.serve_config import serve_env
from cluster.k8s.settings import SecretRef
from cluster.serve_entry import (
    GRPC_TOKEN_ENV,
    HTTP_API_KEY_ENV,
    KV_SECRET_ENV,
    REDIS_URL_ENV,
    SCOPE_ENV,
)

Manifest = dict[str, Any]

AGENT_PORT = 52365
GCS_PORT = 6379
DASHBOARD_PORT = 8265
CLIENT_PORT = 10001
METRICS_PORT = 8080
REDIS_PORT = 6379
REDIS_PASSWORD_ENV = "PDSERVE_REDIS_PASSWORD"
POD_IP_ENV = "PDSERVE_POD_IP"
SHM_VOLUME = "dshm"
MODEL_VOLUME = "models"
REDIS_CA_VOLUME = "redis-ca"
REDIS_CA_DIR = "/etc/pdserve/redis-ca"


def labels(name: str, component: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "pdserve",
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": component,
    }


def quantity_bytes(n: int) -> str:
    """Bytes as a Kubernetes quantity, in whole MiB where exact."""
    return f"{n >> 20}Mi" if n % (1 << 20) == 0 else str(n)


def quantity_cpus(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else f"{round(n * 1000)}m"


def secret_env(name: str, ref: SecretRef) -> Manifest:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def redis_password_ref(name: str, ref: SecretRef | None, suffix: str) -> SecretRef:
    """A Redis server's password Secret: the configured one or `<name>-<suffix>`."""
    return ref or SecretRef(name=f"{name}-{suffix}", key="password")


def _nccl_env(config: ClusterConfig) -> list[Manifest]:
    n = config.kubernetes.nccl
    env = {
        "NCCL_SOCKET_IFNAME": n.socket_ifname,
        "GLOO_SOCKET_IFNAME": n.socket_ifname,
        "NCCL_IB_DISABLE": "1" if n.ib_disable else "0",
        "NCCL_DEBUG": n.debug,
        **n.extra_env,
    }
    return [{"name": k, "value": v} for k, v in sorted(env.items())]


def _redis_env(config: ClusterConfig, name: str) -> list[Manifest]:
    r = config.kubernetes.redis
    if r.mode == "external":
        assert r.url is not None
        return [secret_env(REDIS_URL_ENV, r.url)]
    password = redis_password_ref(name, r.server.password, "redis")
    auth = f":$({REDIS_PASSWORD_ENV})@{name}-redis:{REDIS_PORT}/0"
    url = (
        f"rediss://{auth}?ssl_cert_reqs=required&ssl_ca_certs={REDIS_CA_DIR}/ca.crt"
        if r.server.tls_secret is not None
        else f"redis://{auth}"
    )
    return [secret_env(REDIS_PASSWORD_ENV, password), {"name": REDIS_URL_ENV, "value": url}]


def _gcs_env(config: ClusterConfig, name: str) -> list[Manifest]:
    ft = config.kubernetes.gcs_fault_tolerance
    if ft.redis == "disabled":
        return []
    if ft.redis == "external":
        assert ft.address is not None and ft.password is not None
        return [
            secret_env("RAY_REDIS_ADDRESS", ft.address),
            secret_env("REDIS_PASSWORD", ft.password),
        ]
    if ft.redis == "same":
        server, host = config.kubernetes.redis.server, f"{name}-redis"
        password = redis_password_ref(name, server.password, "redis")
    else:
        server, host = ft.server, f"{name}-gcs-redis"
        password = redis_password_ref(name, server.password, "gcs-redis")
    return [
        {"name": "RAY_REDIS_ADDRESS", "value": f"{host}:{REDIS_PORT}"},
        secret_env("REDIS_PASSWORD", password),
    ]


def ray_env(
    config: ClusterConfig, pod_config: ClusterConfig, name: str, head: bool
) -> list[Manifest]:
    env: list[Manifest] = [
        {"name": k, "value": v} for k, v in sorted(serve_env(pod_config).items())
    ]
    env += _nccl_env(config)
    env.append(
        {
            "name": SCOPE_ENV,
            "valueFrom": {"fieldRef": {"fieldPath": "metadata.labels['ray.io/cluster']"}},
        }
    )
    env += _redis_env(config, name)
    secrets = config.kubernetes.secrets
    if secrets.http_api_key is not None:
        env.append(secret_env(HTTP_API_KEY_ENV, secrets.http_api_key))
    if secrets.grpc_bearer_token is not None:
        env.append(secret_env(GRPC_TOKEN_ENV, secrets.grpc_bearer_token))
    kv_secret = secrets.kv_transfer_secret or SecretRef(name=f"{name}-kv-transfer", key="secret")
    env.append(secret_env(KV_SECRET_ENV, kv_secret))
    if head:
        env.append({"name": POD_IP_ENV, "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
        env += _gcs_env(config, name)
    return env


def _probe(path: str, port: int, *, period: int, failures: int, delay: int) -> Manifest:
    return {
        "httpGet": {"path": path, "port": port},
        "initialDelaySeconds": delay,
        "periodSeconds": period,
        "timeoutSeconds": 2,
        "failureThreshold": failures,
    }


def _ports(config: ClusterConfig, head: bool) -> list[Manifest]:
    s = config.server
    ports = [
        {"name": "serve", "containerPort": s.http_port},
        {"name": "grpc", "containerPort": s.grpc_port},
        {"name": "metrics", "containerPort": METRICS_PORT},
    ]
    if head:
        ports += [
            {"name": "gcs-server", "containerPort": GCS_PORT},
            {"name": "dashboard", "containerPort": DASHBOARD_PORT},
            {"name": "client", "containerPort": CLIENT_PORT},
        ]
    return ports


def pod_template(
    config: ClusterConfig, pod_config: ClusterConfig, name: str, plan: GroupPlan
) -> Manifest:
    """The pod template of one group's Ray container (KubeRay adds `ray start`)."""
    k = config.kubernetes
    head = plan.kind == "head"
    resources: dict[str, str] = {
        "cpu": quantity_cpus(plan.container_cpus),
        "memory": quantity_bytes(plan.memory_bytes),
    }
    if plan.gpus:
        resources[k.gpu_resource] = str(plan.gpus)
    mounts: list[Manifest] = [{"name": SHM_VOLUME, "mountPath": "/dev/shm"}]
    volumes: list[Manifest] = [
        {
            "name": SHM_VOLUME,
            "emptyDir": {"medium": "Memory", "sizeLimit": quantity_bytes(plan.shm_bytes)},
        }
    ]
    tls_secret = k.redis.server.tls_secret if k.redis.mode == "in_cluster" else None
    if tls_secret is not None:  # the CA that signed the project Redis's certificate
        mounts.append({"name": REDIS_CA_VOLUME, "mountPath": REDIS_CA_DIR, "readOnly": True})
        volumes.append(
            {
                "name": REDIS_CA_VOLUME,
                "secret": {
                    "secretName": tls_secret,
                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                },
            }
        )
    if k.model_volume is not None:
        mounts.append(
            {"name": MODEL_VOLUME, "mountPath": k.model_volume.mount_path, "readOnly": True}
        )
        volumes.append(
            {
                "name": MODEL_VOLUME,
                "persistentVolumeClaim": {
                    "claimName": k.model_volume.claim_name,
                    "readOnly": True,
                },
            }
        )
    health = _probe("/api/healthz", AGENT_PORT, period=5, failures=12, delay=10)
    ready = (
        _probe("/api/healthz", AGENT_PORT, period=5, failures=6, delay=10)
        if head
        else _probe("/-/healthz", config.server.http_port, period=5, failures=6, delay=10)
    )
    container: Manifest = {
        "name": "ray-head" if head else "ray-worker",
        "image": plan.image,
        "imagePullPolicy": k.image_pull_policy,
        "env": ray_env(config, pod_config, name, head),
        "ports": _ports(config, head),
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "volumeMounts": mounts,
        "livenessProbe": health,
        "readinessProbe": ready,
    }
    spec: Manifest = {"containers": [container], "volumes": volumes}
    s = plan.settings
    if s.node_selector:
        spec["nodeSelector"] = dict(sorted(s.node_selector.items()))
    if s.tolerations:
        spec["tolerations"] = [_toleration(t.model_dump(exclude_none=True)) for t in s.tolerations]
    if k.image_pull_secrets:
        spec["imagePullSecrets"] = [{"name": n} for n in k.image_pull_secrets]
    component = "ray-head" if head else plan.kind if plan.kind == "router" else "pool"
    meta: Manifest = {"labels": labels(name, component)}
    if plan.pool is not None:
        meta["labels"]["pdserve.io/pool"] = plan.pool.name
    return {"metadata": meta, "spec": spec}


def _toleration(t: Manifest) -> Manifest:
    if "toleration_seconds" in t:
        t["tolerationSeconds"] = t.pop("toleration_seconds")
    return t
