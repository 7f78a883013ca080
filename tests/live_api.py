"""A live router on loopback: the OpenAI app under uvicorn and pdserve.v1 under a
grpc.aio server, both over one real RouterCore, which routes to one real colocated
decode replica (`DecodeWorker` on the engine, with a random tiny Llama) registered in a
real Redis. Valid requests are tokenized, routed and generated; nothing is faked but
Serve itself.

Serve's two pieces are stood in for, without Ray:
- `LocalHandle` is the pool's DeploymentHandle: `options(stream=True)` and
  `<method>.remote(..., replica=...)` call the replica object in this process; a stream
  is pumped by a task of its own, which the router may cancel as it cancels a Serve
  response (the replica's generator then aborts the request).
- `_GrpcServicer` is what Serve's gRPC proxy does with the router's `Generate`: the
  front end sets the status on the context and raises, the proxy ends the call with it.

Both servers and the replica's calls run on one event loop, in a thread of its own;
the tests talk to them over sockets. `assert_idle()` is the leak check: no admission
slot, engine request, output stream, handle task or referenced KV block left.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import socket
import threading
import time
from collections.abc import AsyncIterator, Coroutine, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import grpc
import uvicorn
from router_core import core_settings

from decode_worker.deployment import DecodeWorker
from engine import EngineConfig
from kv_transfer.transport import TransportKind
from protos.pdserve.v1 import pdserve_pb2_grpc
from registry import Registry, Role, connect
from router.core import RouterCore
from router.dispatch import DispatchTimeouts
from router.errors import GrpcStatusError
from router.grpc_api import GrpcFrontend
from router.openai_app import OpenAIApp
from router.settings import RouterSettings
from worker.messages import WorkerSettings, WorkerState

T = TypeVar("T")
REPLICA = "live-0"
WAIT_S = 60.0
_END = object()


class _Stream:
    """A streaming call's response: the replica's generator drained by its own task."""

    def __init__(self, agen: AsyncIterator[Any], handle: LocalHandle) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = handle.task(self._pump(agen))

    async def _pump(self, agen: AsyncIterator[Any]) -> None:
        try:
            async for item in agen:
                self._queue.put_nowait(item)
            self._queue.put_nowait(_END)
        except Exception as e:
            self._queue.put_nowait(e)

    def __aiter__(self) -> _Stream:
        return self

    async def __anext__(self) -> Any:
        item = await self._queue.get()
        if item is _END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self._task.cancel()


class _Remote:
    def __init__(self, handle: LocalHandle, fn: Any) -> None:
        self._handle = handle
        self._fn = fn

    def remote(self, *args: Any, **kwargs: Any) -> Any:
        if inspect.isasyncgenfunction(self._fn):
            return _Stream(self._fn(*args, **kwargs), self._handle)
        return self._handle.task(self._fn(*args, **kwargs))


class LocalHandle:
    """A DeploymentHandle over one in-process replica object."""

    def __init__(self, replica: Any) -> None:
        self._replica = replica
        self.tasks: set[asyncio.Task[Any]] = set()

    def options(self, **_: Any) -> LocalHandle:
        return self

    def task(self, coro: Coroutine[Any, Any, T]) -> asyncio.Task[T]:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    def __getattr__(self, name: str) -> _Remote:
        return _Remote(self, getattr(self._replica, name))


class _GrpcServicer(pdserve_pb2_grpc.PDServeServicer):  # type: ignore[misc]
    def __init__(self, frontend: GrpcFrontend) -> None:
        self._frontend = frontend

    async def Generate(self, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for msg in self._frontend.generate(request, context):
                yield msg
        except GrpcStatusError:
            await context.abort(context.code(), context.details() or "")

    async def ListModels(self, request: Any, context: grpc.aio.ServicerContext) -> Any:
        return self._frontend.list_models(context)


def live_settings(model_dir: Path, redis_url: str) -> RouterSettings:
    """The router's settings of `core_settings`, with timeouts a loaded machine meets."""
    return core_settings(model_dir, redis_url, timeouts=DispatchTimeouts(30.0, 30.0, 30.0, 30.0))


def worker_settings(router: RouterSettings) -> WorkerSettings:
    engine = EngineConfig(
        model=router.model_dir,
        block_size=router.block_size,
        kv_cache_bytes=2 << 20,
        max_model_len=router.max_model_len,
        num_threads=1,
        cpu_linear="plain",
    )
    return WorkerSettings(
        cluster=router.cluster,
        pool="decode",
        role=Role.COLOCATED,
        engine=engine,
        redis_url=router.redis_url,
        lease_ttl_s=router.lease_ttl_s,
        load_report_interval_s=0.2,
        transport=TransportKind.TORCH_DIST,
        transfer_host="127.0.0.1",
        transfer_timeout_s=10.0,
    )


class LiveRouter:
    def __init__(self, settings: RouterSettings) -> None:
        self.settings = settings
        self.worker = DecodeWorker(worker_settings(settings), replica_id=REPLICA)
        self.handle = LocalHandle(self.worker)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="live-router")
        self._thread.start()
        self.http_url = ""
        self.grpc_target = ""
        try:
            self.on_loop(self._open())
        except BaseException:
            self.close()
            raise

    def on_loop(self, coro: Coroutine[Any, Any, T], timeout_s: float = WAIT_S) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result(timeout=timeout_s)

    async def _open(self) -> None:
        self.core = RouterCore(self.settings, self.handle, None)
        await self.core.start()
        deadline = time.monotonic() + WAIT_S
        while not self.core.healthy():
            assert time.monotonic() < deadline, "the replica never joined the router's view"
            await asyncio.sleep(0.05)
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(
            OpenAIApp(self.core).build(), log_level="warning", access_log=False, lifespan="off"
        )
        self._http = uvicorn.Server(config)
        self._http_task = asyncio.get_running_loop().create_task(self._http.serve([sock]))
        while not self._http.started:
            assert time.monotonic() < deadline and not self._http_task.done(), "no HTTP server"
            await asyncio.sleep(0.01)
        self.http_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self._grpc = grpc.aio.server()
        pdserve_pb2_grpc.add_PDServeServicer_to_server(
            _GrpcServicer(GrpcFrontend(self.core)), self._grpc
        )
        port = self._grpc.add_insecure_port("127.0.0.1:0")
        await self._grpc.start()
        self.grpc_target = f"127.0.0.1:{port}"

    def state(self) -> WorkerState:
        return self.on_loop(self.worker.state())

    async def _settle(self) -> None:
        """Let the router's cleanups and the handle's calls run to their end."""
        deadline = time.monotonic() + WAIT_S
        while self.handle.tasks or self.core.admission.inflight:
            assert time.monotonic() < deadline, "calls never settled"
            await asyncio.sleep(0.01)

    def assert_idle(self) -> None:
        self.on_loop(self._settle())
        s = self.state()
        assert (s.num_requests, s.num_streams) == (0, 0), s
        assert s.free_blocks == s.total_blocks, f"{s.total_blocks - s.free_blocks} blocks held"
        assert self.core.admission.inflight == 0

    async def _shut(self) -> None:
        if hasattr(self, "_grpc"):
            await self._grpc.stop(grace=1.0)
        if hasattr(self, "_http"):
            self._http.should_exit = True
            await asyncio.wait_for(self._http_task, 10.0)
        if hasattr(self, "core"):
            await self.core.stop()

    def close(self) -> None:
        """Stop both servers and the router, then the replica (which deregisters)."""
        try:
            if self._thread.is_alive():
                self.on_loop(self._shut())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=10.0)
            self._loop.close()
            self.worker.close()

    def assert_registry_clean(self) -> None:
        """After `close`: the cluster's leases and load reports are gone."""
        client = connect(self.settings.redis_url)
        try:
            reg = Registry(client, self.settings.cluster, lease_ttl_s=self.settings.lease_ttl_s)
            assert reg.live_instances() == [] and reg.loads() == {}
        finally:
            client.close()


@contextlib.contextmanager
def live_router(model_dir: Path, redis_url: str) -> Iterator[LiveRouter]:
    """A live router over a colocated replica; afterwards the replica is idle (no slot,
    request, stream or block held), and once it is closed the registry is clean."""
    router = LiveRouter(live_settings(model_dir, redis_url))
    try:
        yield router
        router.assert_idle()
    finally:
        router.close()
    router.assert_registry_clean()
