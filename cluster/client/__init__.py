"""A small Python client for the pdserve gRPC API, sync (`Client`) and asyncio
(`AsyncClient`), over the generated stubs. The CLI, the tests and the load tests use it.

    with Client("127.0.0.1:9000") as c:
        for chunk in c.stream("Hello", Sampling(max_tokens=32)):
            print(chunk.text, end="")
        done = c.chat([("user", "Hi")], Sampling(temperature=0))

    async with AsyncClient("127.0.0.1:9000") as c:
        done = await c.generate(token_ids=[1, 2, 3])

A stream that is abandoned (a `break`, an exception, a cancelled task) cancels the
call, and the server aborts the request on every pool. Errors are `ClientError`s with
the gRPC status code and the server's message (which names the bad field). A Generate
that fails with UNAVAILABLE before its first chunk is sent again, a bounded number of
times (`RetryPolicy`, counted in the client's `retries`); one that breaks with
UNAVAILABLE after some chunks (its router replica died) is continued on another router
with the tokens and text received so far (the request's `resume`), so the iterator
goes on with no token repeated or missing (counted in `resumes`).
"""

from __future__ import annotations

from cluster.client.aio import AsyncClient
from cluster.client.messages import (
    Chunk,
    ClientError,
    ClusterState,
    Completion,
    Instance,
    InstanceLoad,
    Message,
    ModelCard,
    Pool,
    Sampling,
    Timings,
    Usage,
    build_request,
)
from cluster.client.retry import RetryPolicy
from cluster.client.sync import Client

__all__ = [
    "AsyncClient",
    "Chunk",
    "Client",
    "ClientError",
    "ClusterState",
    "Completion",
    "Instance",
    "InstanceLoad",
    "Message",
    "ModelCard",
    "Pool",
    "RetryPolicy",
    "Sampling",
    "Timings",
    "Usage",
    "build_request",
]
