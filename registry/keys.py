"""Redis key names for one cluster's registry, all under `pdserve:<cluster>:`.

Layout (`<id>` is an instance id):

    pdserve:<cluster>:instances        SET of ids: the index (expired ids until pruned)
    pdserve:<cluster>:instance:<id>    STRING, InstanceInfo JSON: the lease   (lease TTL)
    pdserve:<cluster>:load:<id>        STRING, LoadReport JSON                (lease TTL)
    pdserve:<cluster>:prefix:<id>      SET of block hashes as decimal u64     (lease TTL)
    pdserve:<cluster>:prefix-events    STREAM of add/evict/clear events, capped by MAXLEN ~
    pdserve:<cluster>:roles            HASH id -> role: the controller's role flips
    pdserve:<cluster>:threshold        STRING: the controller's disaggregation threshold
    pdserve:<cluster>:admission:<r>    STRING, AdmissionReport JSON of router replica <r> (TTL)
    pdserve:<cluster>:decisions        STREAM of the controller's decisions, capped
    pdserve:<cluster>:controller       STRING: the id of the controller that acts   (TTL)

Other components (kv_transfer rendezvous) add their own keys under the same prefix;
`Keyspace.pattern` matches all of them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from registry.types import NAME_PATTERN

ROOT = "pdserve"


@dataclass(frozen=True)
class Keyspace:
    cluster: str

    def __post_init__(self) -> None:
        if not re.fullmatch(NAME_PATTERN, self.cluster):
            raise ValueError(
                f"cluster name {self.cluster!r} must match {NAME_PATTERN} "
                "(it is part of every Redis key)"
            )

    @property
    def prefix(self) -> str:
        return f"{ROOT}:{self.cluster}:"

    @property
    def pattern(self) -> str:
        """SCAN pattern for every key of this cluster (names hold no glob characters)."""
        return f"{self.prefix}*"

    @property
    def instances(self) -> str:
        return f"{self.prefix}instances"

    @property
    def instance_prefix(self) -> str:
        return f"{self.prefix}instance:"

    @property
    def load_prefix(self) -> str:
        return f"{self.prefix}load:"

    @property
    def prefix_set_prefix(self) -> str:
        return f"{self.prefix}prefix:"

    @property
    def prefix_events(self) -> str:
        return f"{self.prefix}prefix-events"

    @property
    def roles(self) -> str:
        return f"{self.prefix}roles"

    @property
    def threshold(self) -> str:
        return f"{self.prefix}threshold"

    @property
    def admission_prefix(self) -> str:
        return f"{self.prefix}admission:"

    @property
    def decisions(self) -> str:
        return f"{self.prefix}decisions"

    @property
    def controller(self) -> str:
        return f"{self.prefix}controller"

    def admission(self, router_id: str) -> str:
        return self.admission_prefix + router_id

    def instance(self, instance_id: str) -> str:
        return self.instance_prefix + instance_id

    def load(self, instance_id: str) -> str:
        return self.load_prefix + instance_id

    def prefix_set(self, instance_id: str) -> str:
        return self.prefix_set_prefix + instance_id
