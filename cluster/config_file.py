"""Loading a `ClusterConfig`: a YAML file, then command-line overrides.

Overrides are dotted `key=value` pairs whose values are parsed as YAML; a list entry is
addressed by its `name` or its index (`pools.decode.replicas=2`, `pools.0.tp=2`), and
overriding a pool of the default pool list first materializes that list. Validation
errors are reported one per line with the field's path, pools by name.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from cluster.config import ClusterConfig, ConfigError, default_pools


def _set(data: dict[str, Any], path: str, value: Any) -> None:
    keys = path.split(".")
    node: Any = data
    for i, key in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(node, list):
            index = _list_index(node, key, path)
            if last:
                node[index] = value
            else:
                node = node[index]
            continue
        if not isinstance(node, dict):
            raise ConfigError(f"{path}: {'.'.join(keys[:i])} is not a mapping")
        if last:
            node[key] = value
        else:
            # Only the top-level pool list has defaults to fill in.
            if i == 0 and key == "pools" and "pools" not in node:
                node["pools"] = [p.model_dump() for p in default_pools()]
            node = node.setdefault(key, {})


def _list_index(items: list[Any], key: str, path: str) -> int:
    if key.isdigit() and int(key) < len(items):
        return int(key)
    for i, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return i
    raise ConfigError(f"{path}: no list entry named {key!r}")


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r}: expected key.path=value")
        _set(data, key.strip(), yaml.safe_load(text) if text.strip() else None)
    return data


def _format(e: ValidationError, data: dict[str, Any]) -> str:
    pools = data.get("pools")
    lines = []
    for err in e.errors():
        parts = [str(p) for p in err["loc"]]
        # pools.1.replicas -> pools.decode.replicas, when that pool has a name
        if (
            len(parts) > 1
            and parts[0] == "pools"
            and parts[1].isdigit()
            and isinstance(pools, list)
        ):
            entry = pools[int(parts[1])] if int(parts[1]) < len(pools) else None
            if isinstance(entry, dict) and isinstance(entry.get("name"), str):
                parts[1] = entry["name"]
        loc = ".".join(parts) or "config"
        lines.append(f"  {loc}: {err['msg'].removeprefix('Value error, ')}")
    return "invalid cluster config:\n" + "\n".join(lines)


def load_config(path: str | Path | None = None, overrides: Sequence[str] = ()) -> ClusterConfig:
    """The validated config from a YAML file (or the defaults) plus overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read {path}: {e}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
        data = loaded or {}
    apply_overrides(data, overrides)
    try:
        return ClusterConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_format(e, data)) from None
