"""The Kubernetes renderer: what the default config renders to, how pools become
worker groups (GPUs, pinning, node selectors), secrets by reference only, GCS fault
tolerance wiring, deterministic output, and a clear error for every config it cannot
express."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_validation import CRD_DIR, errors

from cluster.cli import main
from cluster.config import ConfigError
from cluster.config_file import load_config
from cluster.k8s.render import ManifestFile, render, write
from router.sse_guard import CALLBACK_ENV, CALLBACK_PATH

Doc = dict[str, Any]


def _docs(files: list[ManifestFile]) -> dict[tuple[str, str], Doc]:
    return {
        (d["kind"], d["metadata"]["name"]): d
        for f in files
        for d in f.documents
        if d["kind"] != "Kustomization"
    }


def _rayservice(files: list[ManifestFile]) -> Doc:
    (doc,) = [d for f in files for d in f.documents if d["kind"] == "RayService"]
    return doc


def _groups(doc: Doc) -> dict[str, Doc]:
    return {g["groupName"]: g for g in doc["spec"]["rayClusterConfig"]["workerGroupSpecs"]}


def _container(group: Doc) -> Doc:
    (c,) = group["template"]["spec"]["containers"]
    return c


def _env(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_defaults_render_a_cpu_dev_cluster() -> None:
    files = render(load_config())
    assert [f.name for f in files] == [
        "namespace.yaml",
        "redis.yaml",
        "rayservice.yaml",
        "services.yaml",
        "networkpolicy.yaml",
        "kustomization.yaml",
    ]
    docs = _docs(files)
    assert set(docs) == {
        ("Namespace", "pdserve"),
        ("StatefulSet", "pdserve-redis"),
        ("Service", "pdserve-redis"),
        ("RayService", "pdserve"),
        ("Service", "pdserve-grpc"),
        ("Service", "pdserve-http"),
        ("NetworkPolicy", "pdserve-ingress"),
    }
    rs = docs[("RayService", "pdserve")]
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    groups = _groups(rs)
    assert list(groups) == ["router", "prefill", "decode"]
    for g in (cluster["headGroupSpec"], *groups.values()):  # Serve's HTTP proxy's hook
        assert _env(_container(g))[CALLBACK_ENV] == CALLBACK_PATH
    for name in ("prefill", "decode"):
        g = groups[name]
        assert g["replicas"] == g["minReplicas"] == g["maxReplicas"] == 1
        assert g["rayStartParams"]["num-cpus"] == "1"
        assert g["rayStartParams"]["num-gpus"] == "0"
        assert g["rayStartParams"]["resources"] == f"'{{\"pdserve_pool_{name}\":1}}'"
        limits = _container(g)["resources"]["limits"]
        assert limits == _container(g)["resources"]["requests"]
        assert "nvidia.com/gpu" not in limits
        assert _container(g)["image"] == "pdserve-cpu:0.1.0"
    by_port = {s["spec"]["ports"][0]["port"]: s for (k, _), s in docs.items() if k == "Service"}
    assert by_port[9000]["metadata"]["name"] == "pdserve-grpc"
    assert by_port[8000]["metadata"]["name"] == "pdserve-http"
    assert by_port[9000]["spec"]["selector"]["ray.io/serve"] == "true"
    if CRD_DIR.is_dir():
        assert [e for d in docs.values() for e in errors(d)] == []


def test_serve_config_builds_the_app_from_the_pod_config() -> None:
    rs = _rayservice(render(load_config(None, ["router.replicas=2"])))
    serve = yaml.safe_load(rs["spec"]["serveConfigV2"])
    assert serve["http_options"] == {"host": "0.0.0.0", "port": 8000}
    assert serve["grpc_options"]["port"] == 9000
    assert (
        "protos.pdserve.v1.pdserve_pb2_grpc.add_PDServeServicer_to_server"
        in (serve["grpc_options"]["grpc_servicer_functions"])
    )
    (app,) = serve["applications"]
    assert (app["name"], app["route_prefix"], app["import_path"]) == (
        "pdserve",
        "/",
        "cluster.serve_entry:app",
    )
    config = app["args"]["config"]
    assert config["server"]["host"] == "0.0.0.0"
    assert config["kv_transfer"]["host"] == "auto"
    assert config["router"]["replicas"] == 2
    assert [p["resources_per_rank"] for p in config["pools"]] == [
        {"CPU": 1.0, "pdserve_pool_prefill": 1.0},
        {"CPU": 1.0, "pdserve_pool_decode": 1.0},
    ]
    assert "kubernetes" not in config and "redis" not in config


def test_pools_become_gpu_worker_groups_with_their_own_nodes() -> None:
    files = render(
        load_config(Path(__file__).resolve().parents[3] / "deploy/examples/gpu-2p1d/cluster.yaml")
    )
    groups = _groups(_rayservice(files))
    prefill, decode = groups["prefill"], groups["decode"]
    # STRICT_PACK: a pod per replica, with all its TP ranks' GPUs
    assert (prefill["replicas"], decode["replicas"]) == (2, 1)
    assert _container(prefill)["resources"]["limits"]["nvidia.com/gpu"] == "2"
    assert _container(decode)["resources"]["limits"]["nvidia.com/gpu"] == "4"
    assert (
        prefill["rayStartParams"]["num-gpus"] == "2"
        and prefill["rayStartParams"]["num-cpus"] == "8"
    )
    assert decode["rayStartParams"]["resources"] == "'{\"pdserve_pool_decode\":4}'"
    assert _container(prefill)["image"] == "registry.example.com/pdserve-cuda:0.1.0"
    assert _container(groups["router"])["image"] == "registry.example.com/pdserve-cpu:0.1.0"
    assert prefill["template"]["spec"]["nodeSelector"] == {"pdserve.io/node-pool": "prefill"}
    assert decode["template"]["spec"]["tolerations"] == [
        {"effect": "NoSchedule", "key": "nvidia.com/gpu", "operator": "Exists"}
    ]
    # memory limit = pod memory + /dev/shm (a memory-backed emptyDir counts toward it)
    assert _container(decode)["resources"]["limits"]["memory"] == f"{(256 + 16) * 1024}Mi"
    (shm,) = [v for v in decode["template"]["spec"]["volumes"] if v["name"] == "dshm"]
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{16 * 1024}Mi"}
    env = _env(_container(decode))
    assert env["NCCL_SOCKET_IFNAME"] == env["GLOO_SOCKET_IFNAME"] == "eth0"
    assert env["NCCL_P2P_LEVEL"] == "NVL" and env["NCCL_IB_DISABLE"] == "1"
    mounts = {m["mountPath"]: m for m in _container(decode)["volumeMounts"]}
    assert mounts["/models"]["readOnly"] is True and "/dev/shm" in mounts


def test_spread_pools_get_a_pod_per_rank() -> None:
    files = render(
        load_config(
            None,
            [
                "pools.decode.tp=2",
                "pools.decode.replicas=3",
                "pools.decode.placement_strategy=STRICT_SPREAD",
                "pools.decode.resources_per_rank={GPU: 1, CPU: 2}",
            ],
        )
    )
    decode = _groups(_rayservice(files))["decode"]
    assert decode["replicas"] == 6
    assert _container(decode)["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_secrets_are_referenced_never_inlined() -> None:
    files = render(
        load_config(
            None,
            [
                "kubernetes.secrets.http_api_key={name: api, key: http}",
                "kubernetes.secrets.grpc_bearer_token={name: api, key: grpc}",
                "kubernetes.gcs_fault_tolerance.redis=separate",
            ],
        )
    )
    rs = _rayservice(files)
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    env = _env(_container(head))
    assert env["PDSERVE_HTTP_API_KEY"] == {"secretKeyRef": {"name": "api", "key": "http"}}
    assert env["PDSERVE_GRPC_BEARER_TOKEN"] == {"secretKeyRef": {"name": "api", "key": "grpc"}}
    assert env["PDSERVE_REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "pdserve-redis", "key": "password"}
    }
    assert env["PDSERVE_REDIS_URL"] == "redis://:$(PDSERVE_REDIS_PASSWORD)@pdserve-redis:6379/0"
    # GCS fault tolerance: the annotation, the address, the password from its own Secret
    assert rs["metadata"]["annotations"] == {"ray.io/ft-enabled": "true"}
    assert env["RAY_REDIS_ADDRESS"] == "pdserve-gcs-redis:6379"
    assert env["REDIS_PASSWORD"] == {
        "secretKeyRef": {"name": "pdserve-gcs-redis", "key": "password"}
    }
    assert head["rayStartParams"]["redis-password"] == "$REDIS_PASSWORD"
    worker_env = _env(_container(_groups(rs)["decode"]))
    assert "RAY_REDIS_ADDRESS" not in worker_env and "PDSERVE_HTTP_API_KEY" in worker_env
    kinds = list(_docs(files))
    assert ("StatefulSet", "pdserve-gcs-redis") in kinds
    assert all("valueFrom" in e or "value" in e for e in _container(head)["env"])


def test_external_redis_and_gcs_come_from_secrets() -> None:
    files = render(
        load_config(
            None,
            [
                "kubernetes.redis={mode: external, url: {name: r, key: url}}",
                "kubernetes.gcs_fault_tolerance={redis: external, address: {name: g, key: a}, "
                "password: {name: g, key: p}}",
            ],
        )
    )
    assert "redis.yaml" not in [f.name for f in files]
    env = _env(_container(_rayservice(files)["spec"]["rayClusterConfig"]["headGroupSpec"]))
    assert env["PDSERVE_REDIS_URL"] == {"secretKeyRef": {"name": "r", "key": "url"}}
    assert env["RAY_REDIS_ADDRESS"] == {"secretKeyRef": {"name": "g", "key": "a"}}
    assert env["REDIS_PASSWORD"] == {"secretKeyRef": {"name": "g", "key": "p"}}


def test_gcs_fault_tolerance_disabled() -> None:
    rs = _rayservice(render(load_config(None, ["kubernetes.gcs_fault_tolerance.redis=disabled"])))
    assert "annotations" not in rs["metadata"]
    head = rs["spec"]["rayClusterConfig"]["headGroupSpec"]
    assert "redis-password" not in head["rayStartParams"]
    assert "RAY_REDIS_ADDRESS" not in _env(_container(head))


def test_probes_use_ray_and_serve_health_endpoints() -> None:
    rs = _rayservice(render(load_config()))
    head = _container(rs["spec"]["rayClusterConfig"]["headGroupSpec"])
    worker = _container(_groups(rs)["decode"])
    assert head["livenessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert head["readinessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert worker["livenessProbe"]["httpGet"] == {"path": "/api/healthz", "port": 52365}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/-/healthz", "port": 8000}


def test_rendering_is_deterministic_and_write_removes_stale_files(tmp_path: Path) -> None:
    config = load_config(None, ["kubernetes.gcs_fault_tolerance.redis=separate"])
    a, b = render(config), render(config)
    assert [f.text() for f in a] == [f.text() for f in b]
    write(a, tmp_path)
    keep = tmp_path / "notes.yaml"
    keep.write_text("mine: true\n")
    write(
        render(
            load_config(
                None,
                [
                    "kubernetes.redis={mode: external, url: {name: r, key: u}}",
                    "kubernetes.gcs_fault_tolerance.redis=disabled",
                ],
            )
        ),
        tmp_path,
    )
    assert sorted(p.name for p in tmp_path.glob("*.yaml")) == [
        "kustomization.yaml",
        "namespace.yaml",
        "networkpolicy.yaml",
        "notes.yaml",
        "rayservice.yaml",
        "services.yaml",
    ]


CANNOT = [
    (["kv_transfer.transport=shm"], "kv_transfer.transport: shm needs prefill and decode"),
    (["pools.decode.resources_per_rank={GPU: 0.5, CPU: 1}"], "Kubernetes gives pods whole GPUs"),
    (["pools.decode.resources_per_rank={CPU: 1, TPU: 1}"], "have no Kubernetes counterpart"),
    (["pools=[{name: Main, role: colocated}]"], "pools.Main.name: a pool's worker group"),
    (["pools=[{name: router, role: colocated}]"], "other than head or router"),
    (["redis.url=redis://10.0.0.5:6379/0"], "redis.url: on Kubernetes"),
    (["server.api_key=s3cret"], "kubernetes.secrets.http_api_key"),
    (["server.grpc_bearer_token=t0k"], "kubernetes.secrets.grpc_bearer_token"),
    (["kv_transfer.secret=" + "s" * 32], "kubernetes.secrets.kv_transfer_secret"),
    (
        ["kubernetes.service_type=LoadBalancer"],
        "set kubernetes.secrets.http_api_key and kubernetes.secrets.grpc_bearer_token",
    ),
    (
        [
            "kubernetes.service_type=NodePort",
            "kubernetes.secrets.http_api_key={name: api, key: http}",
        ],
        "a NodePort Service is reachable from outside the cluster; set "
        "kubernetes.secrets.grpc_bearer_token",
    ),
    (["model.source=llama"], "must exist inside the pods"),
    (
        ["model.source=/models/m.gguf", "kubernetes.model_volume={claim_name: m}"],
        "a .gguf would be converted separately on each pod",
    ),
    (
        ["model.source=/data/llama", "kubernetes.model_volume={claim_name: m}"],
        "not under the model volume's mount path",
    ),
    (["name=Has_Caps"], "set kubernetes.name"),
    (["name=" + "a" * 48], "at most 47 characters"),
    (["kubernetes.pools={prefil: {memory: 1GiB}}"], "kubernetes.pools: no pool named ['prefil']"),
    (["kubernetes.pools={decode: {shm_size: 100MiB}}"], "kubernetes.pools.decode.shm_size"),
]


@pytest.mark.parametrize(("overrides", "message"), CANNOT, ids=[m for _, m in CANNOT])
def test_what_cannot_be_expressed_fails_clearly(overrides: list[str], message: str) -> None:
    config = load_config(None, overrides)
    with pytest.raises(ConfigError) as err:
        render(config)
    assert message in str(err.value)


BAD_SETTINGS = [
    (
        ["kubernetes.redis={mode: external, url: {name: r, key: u}}"],
        "'same' needs the project's Redis in the cluster",
    ),
    (["kubernetes.redis.mode=external"], "mode external needs the Secret"),
    (["kubernetes.gcs_fault_tolerance.redis=external"], "needs both the address and password"),
    (["kubernetes.namespace=Prod"], "kubernetes.namespace"),
    (
        ["kubernetes.pools={decode: {tolerations: [{operator: Exists, value: x}]}}"],
        "takes no value",
    ),
    (["kubernetes.secrets.http_api_key={name: api}"], "kubernetes.secrets.http_api_key.key"),
    (["kubernetes.redis.server.tls_secret=redis-tls"], "does not give Ray's GCS a TLS"),
    (["kv_transfer.secret=short"], "kv_transfer.secret"),
]


@pytest.mark.parametrize(("overrides", "message"), BAD_SETTINGS, ids=[m for _, m in BAD_SETTINGS])
def test_bad_kubernetes_settings_fail_when_the_config_is_built(
    overrides: list[str], message: str
) -> None:
    with pytest.raises(ConfigError, match="invalid cluster config") as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_cli_renders_and_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "cluster.yaml"
    config.write_text("kubernetes: {namespace: lab}\n")
    assert main(["render", "k8s", "-c", str(config), "--out", str(tmp_path / "out")]) == 0
    text = (tmp_path / "out" / "rayservice.yaml").read_text()
    assert text.startswith("# Rendered by `pdserve render k8s` from cluster.yaml.")
    assert yaml.safe_load(text)["metadata"]["namespace"] == "lab"
    code = main(
        ["render", "k8s", "--set", "kv_transfer.transport=shm", "--out", str(tmp_path / "x")]
    )
    assert code == 2
    assert "kv_transfer.transport: shm needs prefill and decode" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def test_pod_monitor_scrapes_every_ray_pod_and_the_policy_admits_it() -> None:
    config = load_config(
        None,
        [
            "kubernetes.monitoring.pod_monitor=true",
            "kubernetes.monitoring.labels={release: kube-prometheus-stack}",
            "kubernetes.monitoring.prometheus_namespace=monitoring",
        ],
    )
    files = render(config)
    assert "podmonitor.yaml" in [f.name for f in files]
    (kust,) = [d for f in files for d in f.documents if d["kind"] == "Kustomization"]
    assert "podmonitor.yaml" in kust["resources"]
    docs = _docs(files)
    pm = docs[("PodMonitor", "pdserve-metrics")]
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (endpoint,) = pm["spec"]["podMetricsEndpoints"]
    # every Ray pod (head and workers) names the port the PodMonitor scrapes
    rs = docs[("RayService", "pdserve")]
    templates = [rs["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]]
    templates += [g["template"] for g in _groups(rs).values()]
    for t in templates:
        labels = t["metadata"]["labels"]
        assert pm["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ports = {p["name"]: p["containerPort"] for p in t["spec"]["containers"][0]["ports"]}
        assert ports[endpoint["port"]] == 8080
    rules = docs[("NetworkPolicy", "pdserve-ingress")]["spec"]["ingress"]
    scrape = [r for r in rules if r.get("ports") == [{"protocol": "TCP", "port": 8080}]]
    assert len(scrape) == 1
    (source,) = scrape[0]["from"]
    assert source["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": "monitoring"
    }
    assert errors(pm) == []
    # the schema check is strict: a misspelt field or a bad interval fails it
    bad = yaml.safe_load(yaml.safe_dump(pm))
    bad["spec"]["podMetricsEndpoints"][0]["intervall"] = "15s"
    bad["spec"]["podMetricsEndpoints"][0]["interval"] = "15 seconds"
    assert len(errors(bad)) == 2
    if CRD_DIR.is_dir():
        assert [e for d in docs.values() for e in errors(d)] == []


def test_no_pod_monitor_by_default() -> None:
    files = render(load_config())
    assert "podmonitor.yaml" not in [f.name for f in files]
    rules = _docs(files)[("NetworkPolicy", "pdserve-ingress")]["spec"]["ingress"]
    assert all({"protocol": "TCP", "port": 8080} not in r.get("ports", []) for r in rules)
