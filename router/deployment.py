"""The router: the cluster's ingress deployment, on both of Serve's proxies.

Lifecycle of a replica:

    __init__                    load the tokenizer and model config, connect to Redis,
                                take the first cluster view, start refreshing it
    __serve_build_asgi_app__    the OpenAI app (Serve's HTTP proxy, route prefix "/")
    Generate / ListModels /     pdserve.v1.PDServe and grpc.health.v1.Health on Serve's
    ClusterStatus / Check /     gRPC proxy: Serve calls the method named like the RPC
    Watch                       with the request message and the call's grpc_context
    check_health                Serve's probe: the cluster view must be refreshing
    __del__                     stop the refresh task

Each request: validate -> tokenize -> route (router.policy over the cluster view) ->
dispatch to the pinned decode (and prefill) replicas -> stream back. See router.core
and router.dispatch.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI
from grpc_health.v1 import health_pb2
from ray import serve

from protos.pdserve.v1 import pdserve_pb2
from router.core import RouterCore
from router.grpc_api import GrpcFrontend, QuietStatusErrors
from router.openai_app import OpenAIApp
from router.settings import RouterSettings

logger = logging.getLogger(__name__)


@serve.ingress()
class Router:
    async def __init__(  # type: ignore[misc]  # Serve awaits an async constructor
        self, settings: RouterSettings, decode: Any, prefill: Any = None, controller: Any = None
    ) -> None:
        """`decode` and `prefill` are the pools' DeploymentHandles (prefill may be None).
        `controller`, the controller deployment's handle when the application has one,
        is bound here only so that Serve deploys it; the router never calls it."""
        # Serve logs a traceback for every exception a method raises; a gRPC status the
        # router set is already logged by the router, as one line.
        logging.getLogger("ray.serve").addFilter(QuietStatusErrors())
        replica = str(serve.get_replica_context().replica_id.unique_id)
        identity = {"pool": "router", "replica": replica, "rank": "0"}
        self._core = RouterCore(settings, decode, prefill, identity)
        await self._core.start()
        self._grpc = GrpcFrontend(self._core)

    def __serve_build_asgi_app__(self) -> FastAPI:
        return OpenAIApp(self._core).build()

    # -- pdserve.v1.PDServe -------------------------------------------------------------

    async def Generate(
        self, request: pdserve_pb2.GenerateRequest, grpc_context: Any = None
    ) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        async for msg in self._grpc.generate(request, grpc_context):
            yield msg

    async def ListModels(
        self, request: pdserve_pb2.ListModelsRequest, grpc_context: Any = None
    ) -> pdserve_pb2.ListModelsResponse:
        return self._grpc.list_models(grpc_context)

    async def ClusterStatus(
        self, request: pdserve_pb2.ClusterStatusRequest, grpc_context: Any = None
    ) -> pdserve_pb2.ClusterStatusResponse:
        return self._grpc.cluster_status(grpc_context)

    # -- grpc.health.v1.Health ----------------------------------------------------------

    async def Check(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> health_pb2.HealthCheckResponse:
        return self._grpc.check(request, grpc_context)

    async def Watch(
        self, request: health_pb2.HealthCheckRequest, grpc_context: Any = None
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async for msg in self._grpc.watch(request, grpc_context):
            yield msg

    # -- Serve hooks ----------------------------------------------------------------------

    def check_health(self) -> None:
        if not self._core.view.refreshing:
            raise RuntimeError("the cluster view stopped refreshing")

    async def __del__(self) -> None:
        try:
            await asyncio.wait_for(self._core.stop(), 5.0)
        except Exception as e:
            logger.warning("router shutdown: %s", e)
