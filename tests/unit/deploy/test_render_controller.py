"""A cluster with the controller, rendered for KubeRay: the RayService's one Serve
application includes the controller deployment (one replica, built in the cluster from
the same args and environment as the pools), with `planner.scaling` it is deployed with
Serve's external scaler and the pools' worker groups may grow to `planner.max_replicas`
replicas' pods; the manifests pass the CRDs' schemas."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_validation import CRD_DIR, errors, serve_config_errors
from ray import serve

from cluster.config import ConfigError
from cluster.config_file import load_config
from cluster.k8s.render import render
from cluster.serve_entry import app
from controller.deployment import ControllerDeployment

PLANNER = ["planner.enabled=true", "planner.scaling=true", "planner.max_replicas=3"]
ENV = {
    "PDSERVE_REDIS_URL": "redis://:pw@pdserve-redis:6379/0",
    "PDSERVE_REGISTRY_SCOPE": "pdserve-raycluster-q4m8z",
}


def _rayservice(overrides: list[str]) -> dict[str, Any]:
    (doc,) = [
        d
        for f in render(load_config(None, overrides))
        for d in f.documents
        if d["kind"] == "RayService"
    ]
    return doc


def test_scaling_renders_a_scaler_enabled_app_and_pools_that_can_grow() -> None:
    rs = _rayservice(["pools.decode.replicas=2", *PLANNER])
    spec = rs["spec"]
    assert serve_config_errors(spec["serveConfigV2"]) == []
    (application,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    assert application["external_scaler_enabled"] is True
    assert application["args"]["config"]["planner"]["enabled"] is True
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert [(g["replicas"], g["minReplicas"], g["maxReplicas"]) for g in groups.values()] == [
        (1, 1, 1),  # the routers stay as configured
        (1, 1, 3),  # prefill
        (2, 1, 3),  # decode
    ]
    if not CRD_DIR.is_dir():
        pytest.skip(f"no CRD schemas at {CRD_DIR} (set PDSERVE_K8S_SCHEMAS)")
    assert errors(rs) == []


def test_without_scaling_the_groups_stay_fixed() -> None:
    spec = _rayservice(["planner.enabled=true"])["spec"]
    (application,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    assert "external_scaler_enabled" not in application
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is False
    for g in cluster["workerGroupSpecs"]:
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"]


def test_a_pool_named_like_the_controller_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"pools: .*'controller'"):
        render(load_config(None, ["planner.enabled=true", "pools.decode.name=controller"]))


def test_the_app_built_in_the_cluster_has_one_controller_replica(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    overrides = [f"model.source={tiny_model_dir}", "kubernetes.model_volume=null", *PLANNER]
    spec = _rayservice(overrides)["spec"]
    (application,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    built = app(application["args"])
    assert isinstance(built, serve.Application)
    router = built._bound_deployment
    pools = {a._bound_deployment.name for a in router.init_args[1:]}
    assert pools == {"prefill", "decode"}
    controller = router.init_kwargs["controller"]._bound_deployment
    assert controller.name == "controller"
    assert controller.func_or_class is ControllerDeployment
    assert controller.num_replicas == 1
    assert controller.ray_actor_options["num_cpus"] == 0
    (settings,) = controller.init_args
    assert settings.cluster == "pdserve.pdserve-raycluster-q4m8z"  # the pools' registry
    assert settings.redis_url == ENV["PDSERVE_REDIS_URL"]
    assert (settings.prefill_pool, settings.decode_pool) == ("prefill", "decode")
    assert settings.planner.scaling and settings.planner.max_replicas == 3


def test_without_the_planner_the_app_has_no_controller(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = _rayservice([f"model.source={tiny_model_dir}"])["spec"]
    (application,) = yaml.safe_load(spec["serveConfigV2"])["applications"]
    for key, value in ENV.items():
        monkeypatch.setenv(key, value)
    router = app(application["args"])._bound_deployment
    assert "controller" not in router.init_kwargs
