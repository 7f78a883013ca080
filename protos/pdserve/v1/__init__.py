"""`pdserve.v1`: the generated messages and service stubs, plus the service names that
the router registers with gRPC health checking and server reflection.

Importing this package regenerates the stubs first when they are missing or older than
`pdserve.proto`, so a fresh clone works before any build step.
"""

from __future__ import annotations

from grpc_health.v1 import health
from grpc_reflection.v1alpha import reflection

from protos.build import ensure_stubs

ensure_stubs()

from protos.pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc  # noqa: E402

PACKAGE = pdserve_pb2.DESCRIPTOR.package
SERVICE_DESCRIPTOR = pdserve_pb2.DESCRIPTOR.services_by_name["PDServe"]
# "pdserve.v1.PDServe": the name for health status and for reflection.
SERVICE_NAME: str = SERVICE_DESCRIPTOR.full_name
# Pass to `reflection.enable_server_reflection` once the health servicer is added.
REFLECTION_SERVICE_NAMES: tuple[str, ...] = (
    SERVICE_NAME,
    health.SERVICE_NAME,
    reflection.SERVICE_NAME,
)

__all__ = [
    "PACKAGE",
    "REFLECTION_SERVICE_NAMES",
    "SERVICE_DESCRIPTOR",
    "SERVICE_NAME",
    "pdserve_pb2",
    "pdserve_pb2_grpc",
]
