"""The RayService: KubeRay runs the Ray cluster and deploys serveConfigV2 onto it.

    RayService <name>
      metadata.annotations  ray.io/ft-enabled (GCS fault tolerance through Redis)
      spec.serveConfigV2    the Serve application (`cluster.k8s.serve_config`)
      spec.rayClusterConfig
        headGroupSpec       GCS, dashboard, Serve controller; num-cpus 0
        workerGroupSpecs    router, then one group per pool (`cluster.k8s.groups`)

Ray's token authentication is on (`authOptions`, mode token): KubeRay sets
RAY_AUTH_MODE=token and RAY_AUTH_TOKEN (from a Secret it generates, or
kubernetes.ray_auth_secret) on every Ray container, so the GCS, the dashboard and Ray
Client refuse callers without the token; the dashboard binds the head pod's IP only.

KubeRay creates the RayCluster, starts `ray start` in each pod with the group's
rayStartParams, and submits serveConfigV2 to the head's dashboard. On a change of
`rayClusterConfig` it brings up a new RayCluster, switches traffic when its
application is RUNNING, then deletes the old one; a change of serveConfigV2 alone is
applied in place. With GCS fault tolerance the head keeps the cluster's metadata in
Redis (address and password from the pod's environment, see `cluster.k8s.pods`), so a
restarted head picks the running replicas up again.

With the controller's slow loop (`planner.scaling`), each pool's worker group may hold
from `planner.min_replicas` to `planner.max_replicas` replicas' pods, and Ray's
autoscaler (`enableInTreeAutoscaling`) adds a pod when a replica the controller asked
Serve for cannot be placed, and removes pods left idle; without it the groups are fixed.
"""

from __future__ import annotations

import json
from importlib.metadata import version

from cluster.config import ClusterConfig
from cluster.k8s.groups import GroupPlan
from cluster.k8s.pods import POD_IP_ENV, Manifest, labels, pod_template
from cluster.k8s.serve_config import serve_config_v2


def _ray_start_params(plan: GroupPlan, gcs_ft: bool) -> dict[str, str]:
    params = {
        "num-cpus": str(plan.ray_cpus),
        "num-gpus": str(plan.gpus),
        "object-store-memory": str(plan.object_store_bytes),
    }
    if plan.ray_resources:
        amounts = {k: int(v) if v.is_integer() else v for k, v in plan.ray_resources.items()}
        resources = json.dumps(amounts, sort_keys=True, separators=(",", ":"))
        params["resources"] = f"'{resources}'"
    if plan.kind == "head":
        # The pod's own IP, not every interface: KubeRay's operator reaches the
        # dashboard through the head Service (the NetworkPolicy admits only it), and
        # Ray's token authentication guards it.
        params["dashboard-host"] = f"${POD_IP_ENV}"
        if gcs_ft:
            # Ray 2.60 takes the GCS Redis password only on its command line (and hands
            # it to gcs_server the same way); the value comes from the environment.
            params["redis-password"] = "$REDIS_PASSWORD"
    return params


def _pod_range(config: ClusterConfig, plan: GroupPlan, scaling: bool) -> dict[str, int]:
    """minReplicas and maxReplicas of a worker group: its pods, or with the controller's
    scaling the pods of a pool's fewest and most replicas."""
    if not scaling or plan.pool is None:
        return {"minReplicas": plan.pods, "maxReplicas": plan.pods}
    per_replica = plan.pods // plan.pool.replicas
    p = config.planner
    return {
        "minReplicas": per_replica * min(p.min_replicas, plan.pool.replicas),
        "maxReplicas": per_replica * max(p.max_replicas, plan.pool.replicas),
    }


def rayservice(
    config: ClusterConfig, pod_config: ClusterConfig, name: str, plans: list[GroupPlan]
) -> Manifest:
    k = config.kubernetes
    gcs_ft = k.gcs_fault_tolerance.redis != "disabled"
    head, workers = plans[0], plans[1:]
    assert head.kind == "head"
    annotations = {"ray.io/ft-enabled": "true"} if gcs_ft else {}
    scaling = config.planner.enabled and config.planner.scaling
    worker_groups = [
        {
            "groupName": plan.name,
            "replicas": plan.pods,
            **_pod_range(config, plan, scaling),
            "rayStartParams": _ray_start_params(plan, gcs_ft),
            "template": pod_template(config, pod_config, name, plan),
        }
        for plan in workers
    ]
    metadata: Manifest = {"name": name, "namespace": k.namespace, "labels": labels(name, "ray")}
    auth: Manifest = {"mode": "token"}  # RAY_AUTH_MODE=token on every Ray container
    if k.ray_auth_secret is not None:
        auth["secretName"] = k.ray_auth_secret
    if annotations:
        metadata["annotations"] = annotations
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": metadata,
        "spec": {
            "serveConfigV2": serve_config_v2(pod_config),
            "rayClusterConfig": {
                "rayVersion": version("ray"),
                "enableInTreeAutoscaling": scaling,
                "authOptions": auth,
                "headGroupSpec": {
                    "rayStartParams": _ray_start_params(head, gcs_ft),
                    "template": pod_template(config, pod_config, name, head),
                },
                "workerGroupSpecs": worker_groups,
            },
        },
    }
