"""Generates the Python stubs for the `.proto` files under `protos/`.

Run `python -m protos.build` to regenerate, or `python -m protos.build --check` to fail
when the stubs on disk differ from what the `.proto` files produce.

Lifecycle: `generate(out_root)` runs grpc-tools' protoc in-process into a directory
tree that mirrors the proto root, then rewrites the generated absolute imports
(`from pdserve.v1 import ...`) to the repository's package path
(`from protos.pdserve.v1 import ...`). `build()` generates into a temp dir and moves
each file into place with an atomic rename, holding an exclusive lock on the package
dir so that processes importing at the same time neither race nor see half-written
files. `ensure_stubs()`, called when `protos.pdserve.v1` is imported, builds only when
a stub is missing or older than its `.proto` (or than this generator).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import filecmp
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from importlib import resources
from pathlib import Path

logger = logging.getLogger(__name__)

PROTO_ROOT = Path(__file__).resolve().parent
PYTHON_PACKAGE = "protos"
PROTO_FILES: tuple[str, ...] = ("pdserve/v1/pdserve.proto",)
STUB_SUFFIXES: tuple[str, ...] = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")
_LOCK_TIMEOUT_S = 60.0

# Top-level proto packages whose generated imports are rewritten under `protos.`.
_LOCAL_PACKAGES = sorted({proto.split("/", 1)[0] for proto in PROTO_FILES})
_IMPORT_RE = re.compile(rf"^(from|import) ({'|'.join(map(re.escape, _LOCAL_PACKAGES))})\.", re.M)


class StubBuildError(RuntimeError):
    """protoc failed, or its output did not have the expected shape."""


def stub_paths(proto: str, root: Path = PROTO_ROOT) -> list[Path]:
    """The generated files for one `.proto` path (relative to the proto root)."""
    stem = root / proto.removesuffix(".proto")
    return [stem.with_name(stem.name + suffix) for suffix in STUB_SUFFIXES]


def _fix_imports(path: Path, module: str) -> None:
    """Point generated imports at the `protos.` package, and name the module the way it
    is imported, so message classes report the right `__module__`."""
    text = path.read_text()
    fixed = _IMPORT_RE.sub(rf"\1 {PYTHON_PACKAGE}.\2.", text)
    fixed = fixed.replace(f"'{module}'", f"'{PYTHON_PACKAGE}.{module}'")
    if path.name.endswith("_grpc.py") and f"from {PYTHON_PACKAGE}." not in fixed:
        raise StubBuildError(f"{path.name}: found no generated import to rewrite")
    path.write_text(fixed)


def generate(out_root: Path, protos: Sequence[str] = PROTO_FILES) -> list[Path]:
    """Run protoc for `protos` into `out_root`; return the generated files."""
    from grpc_tools import protoc  # type: ignore[import-untyped, unused-ignore]

    well_known = resources.files("grpc_tools") / "_proto"
    args = [
        "grpc_tools.protoc",
        f"--proto_path={PROTO_ROOT}",
        f"--proto_path={well_known}",
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *protos,
    ]
    rc = protoc.main(args)
    if rc != 0:
        raise StubBuildError(f"protoc exited with {rc} for {', '.join(protos)}")
    out: list[Path] = []
    for proto in protos:
        module = proto.removesuffix(".proto").replace("/", ".") + "_pb2"
        for path in stub_paths(proto, out_root):
            if not path.is_file():
                raise StubBuildError(f"protoc did not produce {path.name}")
            _fix_imports(path, module)
            out.append(path)
    return out


@contextlib.contextmanager
def _dir_lock(directory: Path, timeout_s: float = _LOCK_TIMEOUT_S) -> Iterator[None]:
    """An exclusive flock on the directory itself (no lock file left behind)."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise StubBuildError(
                        f"timed out after {timeout_s:.0f}s waiting for the lock on {directory}"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # releases the lock


def is_stale(protos: Sequence[str] = PROTO_FILES, root: Path = PROTO_ROOT) -> bool:
    """True when a stub is missing or older than its `.proto` or this generator."""
    generator_mtime = Path(__file__).stat().st_mtime
    for proto in protos:
        newest_input = max((root / proto).stat().st_mtime, generator_mtime)
        for path in stub_paths(proto, root):
            try:
                if path.stat().st_mtime < newest_input:
                    return True
            except FileNotFoundError:
                return True
    return False


def build(protos: Sequence[str] = PROTO_FILES) -> list[Path]:
    """Regenerate the stubs in place, atomically per file."""
    with _dir_lock(PROTO_ROOT):
        return _build_locked(protos)


def _build_locked(protos: Sequence[str]) -> list[Path]:
    written: list[Path] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-protos-") as tmp:
        for generated in generate(Path(tmp), protos):
            target = PROTO_ROOT / generated.relative_to(tmp)
            staged = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            staged.write_bytes(generated.read_bytes())
            os.replace(staged, target)
            written.append(target)
    logger.info("generated %d stub files from %s", len(written), ", ".join(protos))
    return written


def ensure_stubs(protos: Sequence[str] = PROTO_FILES) -> None:
    """Build the stubs if they are missing or stale. Cheap when they are current."""
    if not is_stale(protos):
        return
    try:
        with _dir_lock(PROTO_ROOT):  # one builder at a time; others wait, then re-check
            if is_stale(protos):
                _build_locked(protos)
    except OSError as exc:
        if all(p.exists() for proto in protos for p in stub_paths(proto)):
            logger.warning("stubs look stale but cannot be rebuilt (%s); using them", exc)
            return
        raise StubBuildError(f"cannot generate the gRPC stubs: {exc}") from exc


def diff(protos: Sequence[str] = PROTO_FILES) -> list[str]:
    """Names of stub files on disk that differ from freshly generated ones."""
    differing: list[str] = []
    with tempfile.TemporaryDirectory(prefix="pdserve-protos-") as tmp:
        for generated in generate(Path(tmp), protos):
            rel = generated.relative_to(tmp)
            on_disk = PROTO_ROOT / rel
            if not on_disk.is_file() or not filecmp.cmp(generated, on_disk, shallow=False):
                differing.append(str(rel))
    return differing


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m protos.build", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if the stubs on disk are not current"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.check:
        differing = diff()
        for name in differing:
            logger.error("stale: protos/%s (run `python -m protos.build`)", name)
        return 1 if differing else 0
    for path in build():
        logger.info("wrote %s", path.relative_to(PROTO_ROOT.parent))
    return 0


if __name__ == "__main__":
    sys.exit(main())
