"""STYLE's size rules, checked over the source tree: no module of the project's packages
over `MAX_MODULE_LINES` lines, and no function on the request path over
`MAX_FUNCTION_LINES` lines.

A module that grows past the bound is split along a concept (by lifecycle stage, or
one role per module), and a long request-path function into named steps. The bounds
cover the code that runs in a cluster; `tests/` and `benchmarks/` are scripts around
it and are not counted, nor are the generated gRPC stubs.
"""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 50

PACKAGES = (
    "engine",
    "kv_transfer",
    "registry",
    "worker",
    "prefill_worker",
    "decode_worker",
    "dual_worker",
    "router",
    "controller",
    "cluster",
    "planner",
    "protos",
)
# What a request runs through, from the router to the pools and the KV it moves.
REQUEST_PATH = (
    "router",
    "worker",
    "prefill_worker",
    "decode_worker",
    "dual_worker",
    "kv_transfer",
    "registry",
)


def sources(root: Path, packages: Iterable[str]) -> Iterator[Path]:
    for pkg in packages:
        for path in sorted((root / pkg).rglob("*.py")):
            if "pdserve" not in path.relative_to(root / pkg).parts:  # generated stubs
                yield path


def long_modules(root: Path, packages: Iterable[str], limit: int = MAX_MODULE_LINES) -> list[str]:
    """`path: N lines` for each module over `limit` lines."""
    out = []
    for path in sources(root, packages):
        n = len(path.read_text().splitlines())
        if n > limit:
            out.append(f"{path.relative_to(root)}: {n} lines")
    return out


def long_functions(
    root: Path, packages: Iterable[str], limit: int = MAX_FUNCTION_LINES
) -> list[str]:
    """`path:line name: N lines` for each function or method over `limit` lines, from
    its `def` to its last line (decorators not counted; nested functions count in
    their parent and on their own)."""
    out = []
    for path in sources(root, packages):
        tree = ast.parse(path.read_text(), filename=str(path))
        defs = [
            node
            for node in ast.walk(tree)
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
        ]
        for node in sorted(defs, key=lambda d: d.lineno):
            assert node.end_lineno is not None
            n = node.end_lineno - node.lineno + 1
            if n > limit:
                out.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {n} lines")
    return out


def test_the_tree_has_every_package() -> None:
    assert [p for p in PACKAGES if not (ROOT / p / "__init__.py").is_file()] == []
    assert set(REQUEST_PATH) <= set(PACKAGES)


def test_no_module_over_the_bound() -> None:
    assert long_modules(ROOT, PACKAGES) == []


def test_no_request_path_function_over_the_bound() -> None:
    assert long_functions(ROOT, REQUEST_PATH) == []


def _write(root: Path, rel: str, text: str) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def _function(name: str, body_lines: int, indent: str = "") -> str:
    body = "".join(f"{indent}    x{i} = {i}\n" for i in range(body_lines))
    return f"{indent}def {name}() -> None:\n{body}"


def test_a_long_module_is_named(tmp_path: Path) -> None:
    _write(tmp_path, "router/ok.py", "x = 1\n" * 400)
    _write(tmp_path, "router/big.py", "x = 1\n" * 401)
    _write(tmp_path, "router/pdserve/stub.py", "x = 1\n" * 900)
    assert long_modules(tmp_path, ["router"]) == ["router/big.py: 401 lines"]


def test_long_functions_and_methods_are_named(tmp_path: Path) -> None:
    text = (
        _function("fits", 49)  # 50 lines with its def
        + _function("too_long", 50)
        + "class C:\n"
        + "    @property\n"
        + _function("method", 50, indent="    ")
        + "async "
        + _function("coroutine", 60)
    )
    _write(tmp_path, "worker/a.py", text)
    found = long_functions(tmp_path, ["worker"])
    assert found == [
        "worker/a.py:51 too_long: 51 lines",
        "worker/a.py:104 method: 51 lines",
        "worker/a.py:155 coroutine: 61 lines",
    ]


def test_only_the_named_packages_are_scanned(tmp_path: Path) -> None:
    _write(tmp_path, "engine/a.py", _function("long", 80))
    _write(tmp_path, "router/a.py", _function("short", 10))
    assert long_functions(tmp_path, ["router"]) == []
    assert long_functions(tmp_path, ["engine", "router"]) == ["engine/a.py:1 long: 81 lines"]
