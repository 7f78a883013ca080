"""`pdserve render k8s`: the cluster config as Kubernetes manifests for KubeRay.

    render(config) -> [ManifestFile]      checks, plans, builds; no I/O
    write(files, out_dir)                 writes them, removes stale rendered files

Files, each a YAML stream with sorted keys so re-renders diff cleanly:

    namespace.yaml       the Namespace (kubernetes.create_namespace)
    redis.yaml           in-cluster Redis StatefulSets and Services (`cluster.k8s.redis`)
    rayservice.yaml      the RayService (`cluster.k8s.rayservice`)
    services.yaml        gRPC and HTTP Services (`cluster.k8s.services`)
    networkpolicy.yaml   the release's ingress policy (`cluster.k8s.network_policy`)
    podmonitor.yaml      Prometheus scraping of every Ray pod's metrics export
                         (kubernetes.monitoring.pod_monitor; `cluster.k8s.monitoring`)
    kustomization.yaml   lists the above, so the directory is a kustomize base

Before building anything, `check` rejects what cannot run on Kubernetes, naming the
field: secrets or a Redis URL written in the config, Services reachable from outside
the cluster (NodePort, LoadBalancer) without both API secrets, shared-memory KV
transfer between pods, a model the pods cannot reach, names that are not DNS labels,
and (in
`cluster.k8s.groups`) fractional GPUs per pod or Ray resources without a Kubernetes
counterpart.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import yaml

from cluster.config import ClusterConfig
from cluster.k8s.groups import RenderError, plan_groups
from cluster.k8s.monitoring import pod_monitor
from cluster.k8s.network_policy import network_policy
from cluster.k8s.pods import Manifest
from cluster.k8s.rayservice import rayservice
from cluster.k8s.redis import redis_servers
from cluster.k8s.serve_config import pod_config
from cluster.k8s.services import client_services, namespace
from cluster.k8s.settings import DNS_LABEL
from controller.deployment import DEPLOYMENT_NAME as CONTROLLER_DEPLOYMENT
from engine.model_source import DEFAULT_MODEL
from kv_transfer.transport import TransportKind

logger = logging.getLogger(__name__)

HEADER = "# Rendered by `pdserve render k8s` from {source}. Do not edit: render again.\n"
_HEADER_START = HEADER.split("{", 1)[0]
_MAX_NAME = 47  # KubeRay: a RayService name plus its RayCluster suffix stays a DNS label


@dataclass(frozen=True)
class ManifestFile:
    name: str
    documents: tuple[Manifest, ...]
    source: str

    def text(self) -> str:
        body = yaml.dump_all(
            self.documents, Dumper=_Dumper, sort_keys=True, default_flow_style=False, width=1000
        )
        return HEADER.format(source=self.source) + body


class _Dumper(yaml.SafeDumper):
    def ignore_aliases(self, data: Any) -> bool:
        return True  # repeated label maps are written out, not as &anchors


def _str(dumper: yaml.SafeDumper, value: str) -> Any:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def resource_name(config: ClusterConfig) -> str:
    name = config.kubernetes.name or config.name
    if re.fullmatch(DNS_LABEL, name) is None or len(name) > _MAX_NAME:
        raise RenderError(
            f"name: {name!r} names the RayService and every object, so it must be a "
            f"lowercase DNS label of at most {_MAX_NAME} characters; set kubernetes.name"
        )
    return name


def _check_model(config: ClusterConfig) -> None:
    source = config.model.source
    volume = config.kubernetes.model_volume
    if volume is not None:
        mount = PurePosixPath(volume.mount_path)
        path = PurePosixPath(source)
        if not path.is_absolute() or mount not in path.parents:
            raise RenderError(
                f"model.source: {source!r} is not under the model volume's mount path "
                f"{volume.mount_path} (kubernetes.model_volume.mount_path)"
            )
        if path.suffix == ".gguf":
            raise RenderError(
                "model.source: a .gguf would be converted separately on each pod; convert "
                "it once into an HF-format directory on the volume and point to that"
            )
    elif source.lower() != DEFAULT_MODEL and not source.startswith("/"):
        raise RenderError(
            f"model.source: {source!r} must exist inside the pods: a known name "
            f"({DEFAULT_MODEL}, baked into the image), an absolute path baked into the "
            "image, or a path on kubernetes.model_volume"
        )


def check(config: ClusterConfig) -> None:
    """Raise `RenderError` if the config asks for something the renderer cannot express."""
    resource_name(config)
    s = config.server
    for field, value in (("api_key", s.api_key), ("grpc_bearer_token", s.grpc_bearer_token)):
        if value is not None:
            raise RenderError(
                f"server.{field}: secrets are not written into manifests; put it in a Secret "
                f"and set kubernetes.secrets.{'http_api_key' if field == 'api_key' else field}"
            )
    k = config.kubernetes
    if k.service_type != "ClusterIP":
        missing = [
            f"kubernetes.secrets.{field}"
            for field in ("http_api_key", "grpc_bearer_token")
            if getattr(k.secrets, field) is None
        ]
        if missing:
            raise RenderError(
                f"kubernetes.service_type: a {k.service_type} Service is reachable from "
                f"outside the cluster; set {' and '.join(missing)} (Secrets) first"
            )
    if config.kv_transfer.secret is not None:
        raise RenderError(
            "kv_transfer.secret: secrets are not written into manifests; put it in a Secret "
            "and set kubernetes.secrets.kv_transfer_secret"
        )
    if config.redis.url is not None:
        raise RenderError(
            "redis.url: on Kubernetes the project's Redis is kubernetes.redis (in_cluster, or "
            "external with the URL in a Secret); unset redis.url (--set redis.url=null)"
        )
    if config.prefill_pool is not None and config.kv_transfer.transport is TransportKind.SHM:
        raise RenderError(
            "kv_transfer.transport: shm needs prefill and decode on one host, but each pool "
            "runs in pods of its own worker group; use torch_dist"
        )
    _check_model(config)
    if config.planner.enabled and CONTROLLER_DEPLOYMENT in {p.name for p in config.pools}:
        raise RenderError(
            f"pools: with planner.enabled the controller is the application's deployment "
            f"{CONTROLLER_DEPLOYMENT!r}; rename that pool"
        )


def render(config: ClusterConfig, *, source: str = "cluster.yaml") -> list[ManifestFile]:
    """The manifests for `config`; `source` is named in each file's header."""
    check(config)
    name = resource_name(config)
    plans = plan_groups(config)
    pods = pod_config(config)
    files: list[ManifestFile] = []
    if config.kubernetes.create_namespace:
        files.append(ManifestFile("namespace.yaml", (namespace(config),), source))
    redis = redis_servers(config, name)
    if redis:
        files.append(ManifestFile("redis.yaml", tuple(redis), source))
    files.append(ManifestFile("rayservice.yaml", (rayservice(config, pods, name, plans),), source))
    files.append(ManifestFile("services.yaml", tuple(client_services(config, name)), source))
    if config.kubernetes.network_policy.enabled:
        policy = (network_policy(config, name),)
        files.append(ManifestFile("networkpolicy.yaml", policy, source))
    if config.kubernetes.monitoring.pod_monitor:
        files.append(ManifestFile("podmonitor.yaml", (pod_monitor(config, name),), source))
    kustomization: Manifest = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [f.name for f in files],
    }
    files.append(ManifestFile("kustomization.yaml", (kustomization,), source))
    logger.info("rendered %s: %s", name, ", ".join(f.name for f in files))
    return files


def write(files: list[ManifestFile], out_dir: Path) -> list[Path]:
    """Write `files` into `out_dir`; remove YAML files an earlier render left there."""
    out_dir.mkdir(parents=True, exist_ok=True)
    names = {f.name for f in files}
    for old in sorted(out_dir.glob("*.yaml")):
        if old.name not in names and old.read_text().startswith(_HEADER_START):
            logger.info("removing stale %s", old)
            old.unlink()
    paths = []
    for f in files:
        path = out_dir / f.name
        path.write_text(f.text())
        paths.append(path)
    return paths
