"""The cluster's Redis registry: instance leases with heartbeats, load reports, and the
prefix-block index. `Registry` is the entry point; see `registry.py` for the lifecycle
and `keys.py` for the key layout.
"""

from __future__ import annotations

from cluster.registry.client import connect
from cluster.registry.heartbeat import Heartbeat
from cluster.registry.keys import Keyspace
from cluster.registry.prefix_index import PrefixEventGap, PrefixEventReader, PrefixIndex
from cluster.registry.registry import Registry
from cluster.registry.types import (
    InstanceInfo,
    LoadReport,
    PrefixEvent,
    PrefixOp,
    PrefixSnapshot,
    Role,
    new_instance_id,
)

__all__ = [
    "Heartbeat",
    "InstanceInfo",
    "Keyspace",
    "LoadReport",
    "PrefixEvent",
    "PrefixEventGap",
    "PrefixEventReader",
    "PrefixIndex",
    "PrefixOp",
    "PrefixSnapshot",
    "Registry",
    "Role",
    "connect",
    "new_instance_id",
]
