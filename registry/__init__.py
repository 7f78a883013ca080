"""The cluster's Redis registry: instance leases with heartbeats, load reports, and the
prefix-block index, and the routing table the controller steers. `Registry` is the
entry point; see `registry.py` for the lifecycle
and `keys.py` for the key layout.
"""

from __future__ import annotations

from registry.client import connect
from registry.heartbeat import Heartbeat
from registry.keys import Keyspace
from registry.prefix_index import PrefixEventGap, PrefixEventReader, PrefixIndex
from registry.registry import Registry
from registry.routing import AdmissionReport, RoutingState, RoutingTable
from registry.types import (
    InstanceInfo,
    LoadReport,
    PrefixEvent,
    PrefixOp,
    PrefixSnapshot,
    Role,
    new_instance_id,
)

__all__ = [
    "AdmissionReport",
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
    "RoutingState",
    "RoutingTable",
    "connect",
    "new_instance_id",
]
