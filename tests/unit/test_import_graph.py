"""DESIGN's rule that imports flow one way, checked over the source tree's import graph.

    engine <- kv_transfer <- registry <- worker <- {prefill_worker, decode_worker}
           <- router <- cluster

A package may import itself, any package to its left, and the leaves `protos` and
`telemetry` (which import none of them). The two worker roles never import each other.
Every import counts: module level, inside functions, and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Each package's place in the order; a package may import those of a lower rank.
RANK: dict[str, int] = {
    "engine": 0,
    "kv_transfer": 1,
    "registry": 2,
    "worker": 3,
    "prefill_worker": 4,
    "decode_worker": 4,
    "router": 5,
    "cluster": 6,
}
LEAVES = ("protos", "telemetry")
PACKAGES = (*RANK, *LEAVES)


@dataclass(frozen=True)
class Edge:
    src: str  # the importing package
    dst: str  # the imported package
    where: str  # file:line of one import that makes the edge


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(node: ast.AST, module: str, is_package: bool) -> Iterator[str]:
    """The absolute module names one import statement names."""
    if isinstance(node, ast.Import):
        yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
        if node.level == 0:
            assert node.module is not None
            yield node.module
            return
        base = module.split(".")
        if not is_package:
            base.pop()
        base = base[: len(base) - (node.level - 1)]
        yield ".".join([*base, node.module] if node.module else base)


def package_edges(root: Path) -> list[Edge]:
    """Every edge between two of `PACKAGES` found in the tree under `root`."""
    edges: dict[tuple[str, str], Edge] = {}
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")):
            if "pdserve" in path.relative_to(root / pkg).parts:  # generated stubs
                continue
            module = _module_name(path, root)
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                for name in _imported(node, module, path.name == "__init__.py"):
                    dst = name.split(".")[0]
                    if dst in PACKAGES and dst != pkg and (pkg, dst) not in edges:
                        where = f"{path.relative_to(root)}:{getattr(node, 'lineno', 0)}"
                        edges[(pkg, dst)] = Edge(pkg, dst, where)
    return sorted(edges.values(), key=lambda e: (e.src, e.dst))


def violations(edges: list[Edge]) -> list[str]:
    """Each edge against the order, as one line naming the file that makes it."""
    bad = []
    for e in edges:
        if e.dst in LEAVES:
            continue
        if e.src in LEAVES:
            bad.append(f"{e.where}: {e.src} is a leaf but imports {e.dst}")
        elif RANK[e.dst] == RANK[e.src]:
            bad.append(f"{e.where}: {e.src} imports {e.dst}; the worker roles are siblings")
        elif RANK[e.dst] > RANK[e.src]:
            bad.append(f"{e.where}: {e.src} imports {e.dst}, which comes after it")
    return bad


def cycles(graph: Mapping[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one package (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def _graph(edges: list[Edge]) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.src, set()).add(e.dst)
    return graph


def test_the_tree_has_every_package_of_the_order() -> None:
    missing = [p for p in PACKAGES if not (ROOT / p / "__init__.py").is_file()]
    assert not missing


def test_imports_flow_one_way() -> None:
    edges = package_edges(ROOT)
    assert edges, "no imports found between the packages"
    assert violations(edges) == []


def test_no_cycle_between_packages() -> None:
    assert cycles(_graph(package_edges(ROOT))) == []


CONTRACT = ("worker/messages.py", "worker/errors.py")  # the router<->pool contract


def test_the_router_pool_contract_is_a_leaf() -> None:
    """The contract's modules import only what lies below the workers."""
    for rel in CONTRACT:
        path = ROOT / rel
        module = _module_name(path, ROOT)
        for node in ast.walk(ast.parse(path.read_text())):
            for name in _imported(node, module, is_package=False):
                top = name.split(".")[0]
                assert top not in RANK or RANK[top] < RANK["worker"], f"{rel} imports {name}"


def _write(root: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


# The layout before `registry/` and `worker/` existed: the decode pool held the code both
# pools run, the registry lived in the cluster package, and the builder imported workers.
OLD_LAYOUT = {
    "engine/__init__.py": "",
    "kv_transfer/__init__.py": "from engine import x\n",
    "decode_worker/__init__.py": "",
    "decode_worker/presence.py": "from cluster.registry import Registry\n",
    "decode_worker/runtime.py": "def f():\n    from .presence import Presence\n",
    "prefill_worker/__init__.py": "",
    "prefill_worker/deployment.py": "from decode_worker.runtime import WorkerRuntime\n",
    "router/__init__.py": "",
    "router/core.py": (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n    from decode_worker.messages import PoolRole\n"
    ),
    "cluster/__init__.py": "",
    "cluster/builder.py": "from decode_worker.deployment import DecodeWorker\n",
    "cluster/registry/__init__.py": "",
    "cluster/registry/registry.py": "from ..redis_server import RedisServer\n",
    "protos/__init__.py": "",
}


def test_the_checks_catch_the_old_layout(tmp_path: Path) -> None:
    _write(tmp_path, OLD_LAYOUT)
    edges = package_edges(tmp_path)
    bad = violations(edges)
    assert any("decode_worker/presence.py:1: decode_worker imports cluster" in b for b in bad)
    assert any("prefill_worker imports decode_worker" in b for b in bad)
    assert cycles(_graph(edges)) == [["cluster", "decode_worker"]]


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"engine/a.py": "import router.core\n"}, "engine imports router"),
        ({"protos/a.py": "from engine import x\n"}, "protos is a leaf but imports engine"),
        ({"decode_worker/a.py": "from prefill_worker import p\n"}, "siblings"),
        ({"worker/a.py": "def f():\n    import decode_worker.x\n"}, "worker imports decode"),
    ],
)
def test_each_kind_of_violation_is_named(
    tmp_path: Path, files: dict[str, str], message: str
) -> None:
    _write(tmp_path, files)
    bad = violations(package_edges(tmp_path))
    assert len(bad) == 1 and message in bad[0]


def test_relative_imports_resolve_within_the_package(tmp_path: Path) -> None:
    _write(tmp_path, {"router/sub/__init__.py": "from ..core import x\nfrom . import y\n"})
    assert package_edges(tmp_path) == []


def test_allowed_edges_pass(tmp_path: Path) -> None:
    _write(
        tmp_path,
        {
            "cluster/a.py": "import engine, router, protos\n",
            "decode_worker/a.py": "from worker.messages import m\nfrom registry import r\n",
            "kv_transfer/a.py": "from protos.pdserve import v1\n",
        },
    )
    edges = package_edges(tmp_path)
    assert len(edges) == 6
    assert violations(edges) == [] and cycles(_graph(edges)) == []
