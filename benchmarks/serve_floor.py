"""Ray Serve's own latency floor for the router path, measured next to a running cluster.

A second Serve application with two trivial deployments: an ingress with the PDServe
`Generate` method, which streams what a streaming handle call to an echo deployment
yields. A call to it crosses everything a routed request crosses outside pdserve's
code: the client's gRPC call, Serve's gRPC proxy, the ingress replica, a streaming
handle call to a second replica and the items' way back. No router on Serve's proxy
and handles gets below its time to first token on the same host and load. Its
replicas take no logical CPUs, so it fits next to any cluster config.

    deploy()                      serve.run of the floor app (Serve must be running)
    ttft_ms(client, token_ids)    one call; milliseconds to its first token
    remove()                      serve.delete of the floor app
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

from ray import serve

from cluster.client import Client, Sampling
from protos.pdserve.v1 import pdserve_pb2

APPLICATION = "serve-floor"


class FloorEcho:
    async def stream(self, token_ids: list[int], count: int) -> AsyncIterator[list[int]]:
        for i in range(count):
            yield token_ids[i % len(token_ids) : i % len(token_ids) + 1]


class FloorIngress:
    def __init__(self, echo: Any) -> None:
        self._echo = echo.options(stream=True)

    async def Generate(
        self, request: pdserve_pb2.GenerateRequest, context: Any = None
    ) -> AsyncIterator[pdserve_pb2.GenerateResponse]:
        ids = list(request.token_ids.ids) or [0]
        count = max(1, request.sampling.max_tokens)
        sent = 0
        async for tokens in self._echo.stream.remote(ids, count):
            sent += 1
            yield pdserve_pb2.GenerateResponse(
                request_id="floor",
                token_ids=tokens,
                finish_reason=(
                    pdserve_pb2.FINISH_REASON_LENGTH
                    if sent == count
                    else pdserve_pb2.FINISH_REASON_UNSPECIFIED
                ),
            )


def deploy() -> None:
    options: dict[str, Any] = {"ray_actor_options": {"num_cpus": 0}}
    echo: Any = serve.deployment(FloorEcho, **options)
    ingress: Any = serve.deployment(FloorIngress, **options)
    serve.run(
        ingress.bind(echo.bind()),
        name=APPLICATION,
        route_prefix=f"/{APPLICATION}",
    )


def remove() -> None:
    serve.delete(APPLICATION)


def ttft_ms(client: Client, token_ids: Sequence[int], max_tokens: int) -> float:
    """One call through the floor app (a `Client` made with application=APPLICATION)."""
    start = time.perf_counter()
    first = None
    for chunk in client.stream(
        token_ids=token_ids, sampling=Sampling(temperature=0, max_tokens=max_tokens)
    ):
        if first is None and chunk.token_ids:
            first = time.perf_counter()
    if first is None:
        raise RuntimeError("the floor app streamed no token")
    return (first - start) * 1000
