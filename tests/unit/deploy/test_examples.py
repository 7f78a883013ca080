"""The examples in deploy/examples: their committed manifests are what the renderer
makes of their cluster.yaml today, every manifest validates offline (Kubernetes
schemas, the KubeRay CRDs, Ray Serve's config schema), and `kubectl kustomize` builds
each base and the overlay where kubectl is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from k8s_validation import CRD_DIR, errors, load_docs

from cluster.config_file import load_config
from cluster.k8s.render import render

EXAMPLES = Path(__file__).resolve().parents[3] / "deploy" / "examples"
NAMES = ["cpu-dev", "gpu-1p1d", "gpu-2p1d"]
OVERLAYS = [EXAMPLES / "overlays" / "staging"]

needs_crds = pytest.mark.skipif(not CRD_DIR.is_dir(), reason=f"KubeRay CRDs not found at {CRD_DIR}")


def _render_command(name: str) -> str:
    return (
        f"pdserve render k8s -c deploy/examples/{name}/cluster.yaml "
        f"--out deploy/examples/{name}/k8s"
    )


@pytest.mark.parametrize("name", NAMES)
def test_committed_manifests_are_current(name: str) -> None:
    files = render(load_config(EXAMPLES / name / "cluster.yaml"))
    out = EXAMPLES / name / "k8s"
    committed = sorted(p.name for p in out.glob("*.yaml"))
    assert committed == sorted(f.name for f in files), f"stale files; run: {_render_command(name)}"
    for f in files:
        assert (out / f.name).read_text() == f.text(), (
            f"{name}/k8s/{f.name} is out of date; run: {_render_command(name)}"
        )


def _manifests(directory: Path) -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(directory.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_docs(path)
    ]


@needs_crds
@pytest.mark.parametrize("name", NAMES)
def test_every_manifest_validates(name: str) -> None:
    docs = _manifests(EXAMPLES / name / "k8s")
    assert {d["kind"] for d in docs} >= {"RayService", "Service", "Namespace"}
    problems = [e for d in docs for e in errors(d)]
    assert problems == []


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    run = subprocess.run(
        [kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return [d for d in yaml.safe_load_all(run.stdout) if d is not None]


def _ids(docs: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return sorted((d["kind"], d["metadata"]["name"]) for d in docs)


@pytest.mark.parametrize("name", NAMES)
def test_kubectl_kustomize_builds_each_example(name: str) -> None:
    built = _kustomize(EXAMPLES / name / "k8s")
    assert _ids(built) == _ids(_manifests(EXAMPLES / name / "k8s"))


@needs_crds
def test_kubectl_kustomize_overlay_retargets_namespace_and_images() -> None:
    built = _kustomize(OVERLAYS[0])
    assert {d["metadata"].get("namespace") for d in built if d["kind"] != "Namespace"} == {
        "pdserve-staging"
    }
    (svc,) = [d for d in built if d["kind"] == "RayService"]
    groups = svc["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    images = {
        c["image"]
        for g in [svc["spec"]["rayClusterConfig"]["headGroupSpec"], *groups]
        for c in g["template"]["spec"]["containers"]
    }
    assert images == {
        "registry.example.com/pdserve-cpu:0.1.1",
        "registry.example.com/pdserve-cuda:0.1.1",
    }
    decode = next(g for g in groups if g["groupName"] == "decode")
    assert (decode["replicas"], decode["minReplicas"], decode["maxReplicas"]) == (2, 2, 2)
    assert [e for d in built for e in errors(d)] == []
