"""Offline validation of Kubernetes manifests, for the deploy tests.

* Core kinds (Namespace, Service, StatefulSet, and every pod template the RayService
  embeds, wrapped as a PodTemplate) against the Kubernetes JSON schemas that the
  kubernetes-validate package ships, in strict mode (unknown fields are errors), for
  each of `K8S_VERSIONS`.
* RayService and RayCluster against the openAPIV3Schema of the KubeRay CRDs in
  ../shared/k8s-schemas (Draft 7). The API server prunes unknown fields of a custom
  resource silently, so the schema is tightened first: wherever it lists properties
  and allows nothing else, an unknown field is an error here.
* serveConfigV2 against Ray Serve's own `ServeDeploySchema`.
* PodMonitor (prometheus-operator's CRD, whose schema is not vendored here) against
  `POD_MONITOR_SCHEMA`: the subset of monitoring.coreos.com/v1 PodMonitor fields the
  renderer writes, strict (unknown fields are errors), with their types and enums as
  the CRD declares them.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

REPO = Path(__file__).resolve().parents[1]
# ../shared/k8s-schemas next to the checkout, or where PDSERVE_K8S_SCHEMAS points
CRD_DIR = Path(os.environ.get("PDSERVE_K8S_SCHEMAS") or REPO.parent / "shared" / "k8s-schemas")
CRD_FILES = {"RayService": "ray.io_rayservices.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
# The oldest and the newest Kubernetes version kubernetes-validate 1.37 ships schemas
# for that this project claims (kubectl here is 1.32).
K8S_VERSIONS = ("1.32.0", "1.37.0")

Doc = dict[str, Any]


def load_docs(path: Path) -> list[Doc]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _tighten(node: Any) -> Any:
    if isinstance(node, dict):
        out = {k: _tighten(v) for k, v in node.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_tighten(v) for v in node]
    return node


@functools.cache
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    crd = yaml.safe_load((CRD_DIR / CRD_FILES[kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    (entry,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = _tighten(copy.deepcopy(entry["schema"]["openAPIV3Schema"]))
    schema["properties"]["metadata"] = {"type": "object"}  # ObjectMeta: checked below
    return jsonschema.Draft7Validator(schema)


_LABELS = {"type": "object", "additionalProperties": {"type": "string"}}
_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": _LABELS,
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "required": ["key", "operator"],
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"enum": ["In", "NotIn", "Exists", "DoesNotExist"]},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
POD_MONITOR_SCHEMA: Doc = {
    "type": "object",
    "additionalProperties": False,
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "PodMonitor"},
        "metadata": {"type": "object"},  # ObjectMeta: checked as a core object's
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "required": ["selector", "podMetricsEndpoints"],
            "properties": {
                "selector": _SELECTOR,
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "any": {"type": "boolean"},
                        "matchNames": {"type": "array", "items": {"type": "string"}},
                    },
                },
                "jobLabel": {"type": "string"},
                "podMetricsEndpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string", "minLength": 1},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$",
                            },
                            "scrapeTimeout": {
                                "type": "string",
                                "pattern": "^(0|(([0-9]+)(y|w|d|h|m|s|ms))+)$",
                            },
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}


def _pod_templates(doc: Doc) -> Iterator[tuple[str, Doc]]:
    spec = doc["spec"]
    cluster = spec["rayClusterConfig"] if doc["kind"] == "RayService" else spec
    yield "head", cluster["headGroupSpec"]["template"]
    for group in cluster.get("workerGroupSpecs", []):
        yield group["groupName"], group["template"]


def errors(doc: Doc) -> list[str]:
    """Every schema violation of one manifest (empty when valid)."""
    kind = doc.get("kind", "?")
    out: list[str] = []
    if kind in CRD_FILES:
        validator = crd_validator(kind, doc["apiVersion"])
        out += [
            f"{kind}: {'.'.join(map(str, e.path))}: {e.message}" for e in validator.iter_errors(doc)
        ]
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        out += _core_errors(meta, f"{kind} metadata")
        for group, template in _pod_templates(doc):
            wrapped = {
                "apiVersion": "v1",
                "kind": "PodTemplate",
                "metadata": {"name": f"{doc['metadata']['name']}-{group}"},
                "template": template,
            }
            out += _core_errors(wrapped, f"{kind} {group} pod template")
        if kind == "RayService":
            out += serve_config_errors(doc["spec"]["serveConfigV2"])
    elif kind == "PodMonitor":
        validator = jsonschema.Draft7Validator(POD_MONITOR_SCHEMA)
        out += [
            f"PodMonitor: {'.'.join(map(str, e.path))}: {e.message}"
            for e in validator.iter_errors(doc)
        ]
        meta = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": doc["metadata"]}
        out += _core_errors(meta, "PodMonitor metadata")
    else:
        out += _core_errors(doc, f"{kind}/{doc.get('metadata', {}).get('name')}")
    return out


def _core_errors(doc: Doc, what: str) -> list[str]:
    out = []
    for version in K8S_VERSIONS:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            out.append(f"{what} (Kubernetes {version}): {'.'.join(map(str, e.path))}: {e.message}")
    return out


def serve_config_errors(text: str) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(yaml.safe_load(text))
    except ValidationError as e:
        return [f"serveConfigV2: {e}"]
    return []
