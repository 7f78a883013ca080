"""The container image's recipe agrees with the project: every pin in pyproject.toml
(and the Makefile's model package) is what deploy/docker installs, and the image
copies every package the project ships."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
DOCKER = ROOT / "deploy" / "docker"


def _pins(lines: list[str]) -> dict[str, str]:
    out = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)(?:\[[^\]]*\])?==([^\s;#]+)\s*", line)
        if m:
            out[re.sub(r"[-_.]+", "-", m.group(1)).lower()] = m.group(2)
    return out


def test_constraints_agree_with_pyproject() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    wanted = _pins(project["dependencies"] + project["optional-dependencies"]["dev"])
    locked = _pins((DOCKER / "constraints.txt").read_text().splitlines())
    torch = wanted.pop("torch")
    assert "torch" not in locked  # installed first, from the variant's index
    mismatched = {n: (v, locked.get(n)) for n, v in wanted.items() if locked.get(n) != v}
    assert mismatched == {}, "regenerate deploy/docker/constraints.txt (pip freeze)"
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert f"ARG TORCH_VERSION={torch}\n" in dockerfile
    smollm2 = re.search(r"^SMOLLM2 := (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert smollm2 is not None and f"ARG SMOLLM2={smollm2.group(1)}\n" in dockerfile


def test_image_copies_every_project_package() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = [
        p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    ]
    dockerfile = (DOCKER / "Dockerfile").read_text()
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
    for package in packages:
        assert f"COPY {package} {package}\n" in dockerfile, package
        assert f"!{package}/" in ignore, package
