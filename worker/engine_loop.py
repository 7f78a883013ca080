"""The engine thread: one thread owns an `LLMEngine`; asyncio code talks to it through
commands and per-request output streams. Every pool's replica runs one.

Lifecycle:

    EngineLoop(engine, name=...).start()   the thread starts and idles
    submit(fn) / await call(fn)            fn(engine) runs on the engine thread between
                                           steps, in a copy of the caller's context (so
                                           its log lines carry the caller's request id);
                                           its result or exception comes back
    open_stream(request_id)                an asyncio queue for the request's outputs;
                                           the engine thread posts every RequestOutput
                                           of that request to it (and drops the stream
                                           after the finished one)
    one iteration                          run queued commands, then the `tick` hook,
                                           then one `engine.step()` when the scheduler
                                           has work (timed, for the metrics, which also
                                           sample the engine's state every so often);
                                           an idle loop waits on the inbox
    stop()                                 the thread exits after its iteration
                                           (bounded join); open streams get EngineStopped

A step that raises marks the loop failed: every open stream gets the error and `check()`
raises it, so Serve's health check replaces the replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

from engine import LLMEngine, RequestOutput
from registry import LoadReport
from worker.errors import InstanceUnavailable
from worker.pool_metrics import EngineMetrics

logger = logging.getLogger(__name__)

T = TypeVar("T")
Command = Callable[[], None]

COMMAND_TIMEOUT_S = 30.0  # the default bound of one engine command (`call`)


class EngineStopped(InstanceUnavailable):
    """The engine loop stopped or failed; no more outputs will come."""


class OutputStream:
    """The outputs of one request, handed from the engine thread to an event loop."""

    def __init__(self, request_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.request_id = request_id
        self._loop = loop
        self._queue: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self.posted_wall = 0.0  # time.time() of the latest post

    def post(self, item: RequestOutput | BaseException) -> None:
        """Called on the engine thread."""
        self.posted_wall = time.time()
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    async def get(self, timeout_s: float) -> list[RequestOutput]:
        """Wait (bounded) for at least one output, then take every output queued."""
        first = await asyncio.wait_for(self._queue.get(), timeout_s)
        items = [first]
        while not self._queue.empty():
            items.append(self._queue.get_nowait())
        outs: list[RequestOutput] = []
        for item in items:
            if isinstance(item, BaseException):
                raise item
            outs.append(item)
        return outs


class EngineLoop:
    def __init__(
        self,
        engine: LLMEngine,
        *,
        name: str,
        tick: Callable[[], None] | None = None,
        busy: Callable[[], bool] | None = None,
        idle_wait_s: float = 0.02,
        busy_wait_s: float = 0.001,
        metrics: EngineMetrics | None = None,
    ) -> None:
        """`tick` runs on the engine thread every iteration; while `busy()` is true (for
        example, transfers to poll) an idle loop waits `busy_wait_s` instead of
        `idle_wait_s`. `metrics` gets each step's time and tokens, and samples the
        engine's state between steps."""
        self.engine = engine
        self._metrics = metrics
        self.name = name
        self._tick = tick
        self._busy = busy
        self._idle_wait_s = idle_wait_s
        self._busy_wait_s = busy_wait_s
        self._inbox: queue.SimpleQueue[Command] = queue.SimpleQueue()
        self._streams: dict[str, OutputStream] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failure: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"engine-{name}", daemon=True)
        pool = engine.block_pool
        self._load = (0, 0, pool.num_free, pool.num_blocks)

    # -- lifecycle --------------------------------------------------------------------

    def start(self) -> EngineLoop:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._inbox.put(lambda: None)  # wake an idle wait
        if self._thread.is_alive() and threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
            if self._thread.is_alive():
                logger.error("engine loop %s did not stop within %.1fs", self.name, timeout_s)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self._stop.is_set()

    def check(self) -> None:
        """Raise if the loop failed or stopped (Serve's health check calls this)."""
        if self._failure is not None:
            raise EngineStopped(f"engine loop {self.name} failed: {self._failure!r}")
        if not self._thread.is_alive():
            raise EngineStopped(f"engine loop {self.name} is not running")
        try:
            self.engine.check()
        except Exception as e:
            raise EngineStopped(f"engine {self.name}: {e}") from e

    # -- commands ---------------------------------------------------------------------

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run `fn` on the engine thread between steps."""
        fut: Future[T] = Future()
        if not self.running:
            fut.set_exception(EngineStopped(f"engine loop {self.name} is not running"))
            return fut

        ctx = contextvars.copy_context()

        def run() -> None:
            if not fut.set_running_or_notify_cancel():
                return
            try:
                fut.set_result(ctx.run(fn))
            except BaseException as e:
                fut.set_exception(e)

        self._inbox.put(run)
        return fut

    async def call(self, fn: Callable[[], T], timeout_s: float = COMMAND_TIMEOUT_S) -> T:
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(fn)), timeout_s)

    # -- streams ----------------------------------------------------------------------

    def open_stream(self, request_id: str) -> OutputStream:
        """Register a stream on the calling event loop before the request is added."""
        stream = OutputStream(request_id, asyncio.get_running_loop())
        with self._lock:
            if request_id in self._streams:
                raise ValueError(f"request {request_id!r} already has a stream")
            self._streams[request_id] = stream
        return stream

    def close_stream(self, request_id: str) -> None:
        with self._lock:
            self._streams.pop(request_id, None)

    def end_stream(self, request_id: str, error: BaseException) -> None:
        """Drop the request's stream and end its reader with `error` (an abort: the
        reader may be suspended where a cancellation cannot reach it)."""
        with self._lock:
            stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.post(error)

    def has_stream(self, request_id: str) -> bool:
        with self._lock:
            return request_id in self._streams

    @property
    def num_streams(self) -> int:
        with self._lock:
            return len(self._streams)

    def post(self, out: RequestOutput) -> None:
        """Route one output to its stream (engine thread). Drops it if nobody listens."""
        with self._lock:
            stream = self._streams.get(out.request_id)
            if stream is not None and out.finished:
                del self._streams[out.request_id]
        if stream is not None:
            stream.post(out)

    # -- load -------------------------------------------------------------------------

    def load_report(self) -> LoadReport:
        """The engine's load as of its last iteration (any thread)."""
        queued, running, free, total = self._load
        return LoadReport(
            queued_prefill_tokens=queued,
            running_seqs=running,
            free_kv_blocks=free,
            total_kv_blocks=total,
        )

    def _update_load(self) -> None:
        load = self.engine.load()
        self._load = (
            load.queued_prefill_tokens,
            load.running_seqs,
            load.free_blocks,
            load.total_blocks,
        )

    # -- the thread -------------------------------------------------------------------

    def _drain(self) -> None:
        while True:
            try:
                cmd = self._inbox.get_nowait()
            except queue.Empty:
                return
            cmd()

    def _wait(self) -> None:
        busy = self._busy is not None and self._busy()
        try:
            cmd = self._inbox.get(timeout=self._busy_wait_s if busy else self._idle_wait_s)
        except queue.Empty:
            return
        cmd()

    def _run(self) -> None:
        engine = self.engine
        last_load = 0.0
        try:
            while not self._stop.is_set():
                self._drain()
                if self._tick is not None:
                    self._tick()
                stalled = False
                if engine.scheduler.has_work():
                    started = time.perf_counter()
                    outputs = engine.step()
                    if self._metrics is not None and engine.last_step_tokens:
                        self._metrics.stepped(
                            time.perf_counter() - started, engine.last_step_tokens
                        )
                    for out in outputs:
                        self.post(out)
                    # Waiting prompts that no block can take until a command frees some.
                    stalled = not outputs and not engine.scheduler.running
                now = time.monotonic()
                if now - last_load > 0.02:
                    self._update_load()
                    last_load = now
                if self._metrics is not None:
                    self._metrics.sample(engine, now)
                if stalled or not engine.scheduler.has_work():
                    self._wait()
        except BaseException as e:
            self._failure = e
            logger.exception("engine loop %s failed", self.name)
        finally:
            self._stop.set()
            with self._lock:
                streams, self._streams = list(self._streams.values()), {}
            err = EngineStopped(f"engine loop {self.name} stopped")
            if self._failure is not None:
                err = EngineStopped(f"engine loop {self.name} failed: {self._failure!r}")
            for stream in streams:
                stream.post(err)
            # Commands queued after the last iteration still run, so their futures
            # resolve; they see the engine as it was left.
            self._drain()
