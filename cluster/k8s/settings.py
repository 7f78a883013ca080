"""The cluster config's `kubernetes:` section: what only a Kubernetes deployment needs.

Everything else (pools, TP/PP, resources per rank, ports, engine limits) comes from
the rest of the `ClusterConfig`, so `pdserve up` and `pdserve render k8s` read one
source of truth. Defaults render a CPU dev cluster that runs on any cluster with the
KubeRay operator: the CPU image, an in-cluster Redis that also holds the GCS fault
tolerance state, ClusterIP Services.

Secrets are only ever referenced (`SecretRef`: a Secret's name and key); no password,
token or URL with credentials is ever written into a manifest, and they reach the
containers through their environment (secretKeyRef) or mounted files, never their
command lines. Checks that need the
rest of the config (pool names exist, GPU counts are whole, the model is reachable)
run in `cluster.k8s.render`.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ByteSize, ConfigDict, Field, model_validator

_STRICT = ConfigDict(extra="forbid")
DNS_LABEL = r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$"
DnsLabel = Annotated[str, Field(pattern=DNS_LABEL)]
SecretName = Annotated[str, Field(pattern=r"^[a-z0-9]([-.a-z0-9]{0,251}[a-z0-9])?$")]
SecretKey = Annotated[str, Field(pattern=r"^[-._a-zA-Z0-9]{1,253}$")]


class SecretRef(BaseModel):
    """A key of a Secret in the cluster's namespace, created by the operator of the
    cluster (`kubectl create secret generic NAME --from-literal=KEY=...`)."""

    model_config = _STRICT

    name: SecretName = Field(description="The Secret's name.")
    key: SecretKey = Field(description="The key inside the Secret.")


class Toleration(BaseModel):
    model_config = _STRICT

    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _operator(self) -> Toleration:
        if self.operator == "Exists" and self.value is not None:
            raise ValueError("a toleration with operator Exists takes no value")
        if self.toleration_seconds is not None and self.effect != "NoExecute":
            raise ValueError("toleration_seconds only applies to effect NoExecute")
        return self


class GroupSettings(BaseModel):
    """Pods of one Ray node group (the head, the routers, or one pool)."""

    model_config = _STRICT

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the group's pods require."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints the group's pods tolerate."
    )
    memory: ByteSize | None = Field(
        default=None,
        description="Memory of one pod (request = limit), without /dev/shm; default: "
        "4GiB per engine rank in a pool pod, 4GiB for the head, 2GiB for a router.",
    )
    extra_cpus: float = Field(
        default=1.0,
        ge=0,
        description="CPUs a pod gets beyond what its Ray work asks for: the raylet, the "
        "Serve proxy, the dashboard agent.",
    )
    shm_size: ByteSize | None = Field(
        default=None,
        description="The /dev/shm emptyDir (memory-backed; counts toward the pod's memory "
        "limit): NCCL's shared-memory transport between the GPUs of a pod, and Ray's "
        "object store (half of it). Default: 1GiB, plus 2GiB per GPU.",
    )
    image: str | None = Field(
        default=None, description="Image override; default: the GPU or CPU image."
    )


class ModelVolume(BaseModel):
    """A PersistentVolumeClaim holding models as HF-format directories, mounted at the
    same path in every Ray pod (ReadOnlyMany, or ReadWriteOnce on a single node)."""

    model_config = _STRICT

    claim_name: DnsLabel = Field(description="The PersistentVolumeClaim's name.")
    mount_path: str = Field(
        default="/models", pattern=r"^/", description="Where every Ray pod mounts it."
    )


class RedisServer(BaseModel):
    """A single-replica Redis StatefulSet plus a Service, in the cluster's namespace."""

    model_config = _STRICT

    image: str = Field(default="redis:7.2.5-alpine", description="Redis image.")
    password: SecretRef | None = Field(
        default=None,
        description="Its requirepass; default: Secret `<name>-redis` (or "
        "`<name>-gcs-redis`), key `password`. Use a URL-safe value (e.g. hex).",
    )
    storage: ByteSize | None = Field(
        default=None,
        description="A PersistentVolumeClaim of this size with append-only persistence; "
        "None: an emptyDir (state is lost with the pod).",
    )
    storage_class: str | None = Field(default=None, description="The claim's StorageClass.")
    memory: ByteSize = Field(default=ByteSize(1 << 30), description="Memory (request = limit).")
    cpu: float = Field(default=0.5, gt=0, description="CPU request and limit.")
    tls_secret: SecretName | None = Field(
        default=None,
        description="Serve TLS only, from this Secret (keys tls.crt, tls.key and ca.crt, "
        "e.g. from cert-manager); clients then use rediss:// and check the server's "
        "certificate against ca.crt. None: plaintext inside the cluster network.",
    )


class ProjectRedis(BaseModel):
    """The project's Redis (registry, load reports, rendezvous, prefix index)."""

    model_config = _STRICT

    mode: Literal["in_cluster", "external"] = Field(
        default="in_cluster",
        description="in_cluster: render a Redis StatefulSet and Service; external: a "
        "redis:// URL (credentials included) read from `url` (a Secret).",
    )
    url: SecretRef | None = Field(default=None, description="external: the URL's Secret.")
    server: RedisServer = Field(default_factory=lambda: RedisServer.model_validate({}))

    @model_validator(mode="after")
    def _mode(self) -> ProjectRedis:
        if self.mode == "external" and self.url is None:
            raise ValueError("url: mode external needs the Secret that holds the redis:// URL")
        if self.mode == "in_cluster" and self.url is not None:
            raise ValueError("url: only for mode external")
        return self


class GcsFaultTolerance(BaseModel):
    """KubeRay GCS fault tolerance (`ray.io/ft-enabled`): the head keeps the cluster's
    metadata in a Redis, so a restarted head recovers it and Serve keeps serving."""

    model_config = _STRICT

    redis: Literal["same", "separate", "external", "disabled"] = Field(
        default="same",
        description="same: the project's in-cluster Redis; separate: a second in-cluster "
        "Redis; external: `address` and `password` Secrets; disabled: no fault tolerance.",
    )
    address: SecretRef | None = Field(default=None, description="external: HOST:PORT.")
    password: SecretRef | None = Field(default=None, description="external: the password.")
    server: RedisServer = Field(
        default_factory=lambda: RedisServer.model_validate({}),
        description="separate: the second Redis.",
    )

    @model_validator(mode="after")
    def _mode(self) -> GcsFaultTolerance:
        external = self.address is not None or self.password is not None
        if self.redis == "external" and (self.address is None or self.password is None):
            raise ValueError("redis external needs both the address and password Secrets")
        if self.redis != "external" and external:
            raise ValueError("address/password: only for redis external")
        return self


class ApiSecrets(BaseModel):
    """The API credentials, from Secrets (the config's server.api_key and
    server.grpc_bearer_token must stay unset for Kubernetes)."""

    model_config = _STRICT

    http_api_key: SecretRef | None = Field(default=None, description="HTTP Bearer API key.")
    grpc_bearer_token: SecretRef | None = Field(default=None, description="gRPC bearer token.")
    kv_transfer_secret: SecretRef | None = Field(
        default=None,
        description="The cluster secret sealing the KV control channels' HELLOs (at least "
        "32 characters, e.g. 64 hex digits); default: Secret `<name>-kv-transfer`, key "
        "`secret`.",
    )


class NetworkPolicySettings(BaseModel):
    """A NetworkPolicy over the release's pods: from outside the release only the
    Services' ports (gRPC, HTTP) are admitted, plus the Ray dashboard and agent ports
    from the KubeRay operator (which submits the Serve config there); inside the
    release, everything."""

    model_config = _STRICT

    enabled: bool = Field(default=True, description="Render the NetworkPolicy.")
    operator_namespace: DnsLabel | None = Field(
        default=None,
        description="The KubeRay operator's namespace; None: its pods in any namespace.",
    )
    operator_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "kuberay-operator"},
        description="Labels of the KubeRay operator's pods (its Helm chart's default).",
    )


class MonitoringSettings(BaseModel):
    """Prometheus (prometheus-operator) scraping of every Ray pod's metrics export,
    which carries the metrics of each router, pool replica and rank actor on the pod."""

    model_config = _STRICT

    pod_monitor: bool = Field(
        default=False,
        description="Render a PodMonitor (podmonitor.yaml); the cluster needs the "
        "monitoring.coreos.com CRDs of prometheus-operator.",
    )
    interval_s: int = Field(default=15, ge=1, le=3600, description="Scrape interval.")
    labels: dict[str, str] = Field(
        default_factory=dict,
        description="Labels on the PodMonitor, for the Prometheus' podMonitorSelector "
        "(e.g. {release: kube-prometheus-stack}).",
    )
    prometheus_namespace: DnsLabel | None = Field(
        default=None,
        description="The NetworkPolicy admits scrapes from Prometheus pods in this "
        "namespace; None: in any namespace.",
    )
    prometheus_labels: dict[str, str] = Field(
        default_factory=lambda: {"app.kubernetes.io/name": "prometheus"},
        description="Labels of the Prometheus pods the NetworkPolicy admits.",
    )


class NcclSettings(BaseModel):
    """Environment for NCCL (GPU collectives and KV transfer) and Gloo (CPU) in every
    Ray pod. See deploy/README.md for what each does."""

    model_config = _STRICT

    socket_ifname: str = Field(
        default="eth0", description="NCCL_SOCKET_IFNAME and GLOO_SOCKET_IFNAME: the pod NIC."
    )
    ib_disable: bool = Field(
        default=True,
        description="NCCL_IB_DISABLE: true unless the pods have RDMA devices (InfiniBand, "
        "RoCE) exposed by a device plugin.",
    )
    debug: Literal["VERSION", "WARN", "INFO", "TRACE"] = Field(
        default="WARN", description="NCCL_DEBUG."
    )
    extra_env: dict[str, str] = Field(
        default_factory=dict, description="More NCCL_*/GLOO_* variables, e.g. NCCL_P2P_LEVEL."
    )


class KubernetesSettings(BaseModel):
    model_config = _STRICT

    namespace: DnsLabel = Field(default="pdserve", description="Namespace of every object.")
    create_namespace: bool = Field(default=True, description="Render the Namespace too.")
    name: DnsLabel | None = Field(
        default=None,
        max_length=47,
        description="The RayService's name, prefix of every object; default: the cluster "
        "name (which then must be a DNS label of at most 47 characters).",
    )
    image: str = Field(default="pdserve-cpu:0.1.0", description="Image of CPU pods.")
    gpu_image: str = Field(default="pdserve-cuda:0.1.0", description="Image of GPU pods.")
    image_pull_policy: Literal["IfNotPresent", "Always", "Never"] = "IfNotPresent"
    image_pull_secrets: list[DnsLabel] = Field(default_factory=list)
    gpu_resource: str = Field(
        default="nvidia.com/gpu", description="The extended resource that schedules GPUs."
    )
    head: GroupSettings = Field(
        default_factory=lambda: GroupSettings.model_validate({}),
        description="The Ray head: GCS, dashboard, Serve controller; no replicas run here.",
    )
    router: GroupSettings = Field(
        default_factory=lambda: GroupSettings.model_validate({}),
        description="The router group: one pod per router replica.",
    )
    pools: dict[str, GroupSettings] = Field(
        default_factory=dict, description="Per pool (by name): its worker group's pods."
    )
    model_volume: ModelVolume | None = Field(
        default=None,
        description="Models from a volume; None: the model is in the image (a known name "
        "pre-converted at build time, or an absolute path baked in).",
    )
    redis: ProjectRedis = Field(default_factory=lambda: ProjectRedis.model_validate({}))
    gcs_fault_tolerance: GcsFaultTolerance = Field(
        default_factory=lambda: GcsFaultTolerance.model_validate({})
    )
    secrets: ApiSecrets = Field(default_factory=lambda: ApiSecrets.model_validate({}))
    nccl: NcclSettings = Field(default_factory=lambda: NcclSettings.model_validate({}))
    service_type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP",
        description="Type of the gRPC and HTTP Services; NodePort and LoadBalancer need "
        "secrets.http_api_key and secrets.grpc_bearer_token.",
    )
    network_policy: NetworkPolicySettings = Field(
        default_factory=lambda: NetworkPolicySettings.model_validate({})
    )
    monitoring: MonitoringSettings = Field(
        default_factory=lambda: MonitoringSettings.model_validate({})
    )
    ray_auth_secret: SecretName | None = Field(
        default=None,
        description="Ray's token authentication (RAY_AUTH_MODE=token, always on): the "
        "Secret holding the token (key `auth_token`); None: KubeRay generates one.",
    )

    @model_validator(mode="after")
    def _redis(self) -> KubernetesSettings:
        if self.gcs_fault_tolerance.redis == "same" and self.redis.mode == "external":
            raise ValueError(
                "gcs_fault_tolerance.redis: 'same' needs the project's Redis in the cluster; "
                "with an external project Redis use 'external' (address and password Secrets)"
            )
        ft = self.gcs_fault_tolerance
        gcs_tls = self.redis.server.tls_secret if ft.redis == "same" else ft.server.tls_secret
        if ft.redis in ("same", "separate") and gcs_tls is not None:
            raise ValueError(
                "gcs_fault_tolerance.redis: the renderer does not give Ray's GCS a TLS "
                "connection to Redis; with redis.server.tls_secret use 'separate' (a "
                "plaintext GCS Redis without tls_secret), 'external' or 'disabled'"
            )
        return self
