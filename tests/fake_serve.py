"""Fake Serve handles for the router's dispatch, without Ray: a decode pool whose
`generate` streams `TokenChunk`s and a prefill pool whose `prefill` pushes a fake
transfer, meeting over a `FakeTransfers` rendezvous as the real pools meet over
kv_transfer. Failures can be injected at each point, and `assert_idle` is the leak
check: no request left on any instance, no transfer registered, no stream open.

The handles mirror the few calls the router makes: `handle.options(stream=True)`,
`handle.<method>.remote(*args, replica=...)` returning an awaitable (a task that can be
cancelled, as a Serve response can) or, for a stream, an async iterator with `cancel()`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from worker.messages import (
    FallbackReason,
    FinalStats,
    PrefillOutcome,
    PrefillRequest,
    TokenChunk,
    WorkerRequest,
)


class FakeTransfers:
    """Where a decode instance registers a transfer and a prefill completes it; either
    may come first (a completion before the registration waits for it)."""

    def __init__(self) -> None:
        self._registered: dict[str, asyncio.Event] = {}
        self._early: set[str] = set()
        self.failures: dict[str, str] = {}  # transfer id -> why its KV will not come

    def register(self, transfer_id: str) -> asyncio.Event:
        event = self._registered[transfer_id] = asyncio.Event()
        if transfer_id in self._early:
            self._early.discard(transfer_id)
            event.set()
        return event

    def complete(self, transfer_id: str) -> None:
        event = self._registered.get(transfer_id)
        if event is None:
            self._early.add(transfer_id)
        else:
            event.set()

    def fail(self, transfer_id: str, reason: str) -> None:
        """The decode side learnt that the KV will not come (a registered transfer)."""
        self.failures[transfer_id] = reason
        self._registered[transfer_id].set()

    def end(self, transfer_id: str) -> None:
        self._registered.pop(transfer_id, None)
        self._early.discard(transfer_id)
        self.failures.pop(transfer_id, None)

    @property
    def num_registered(self) -> int:
        return len(self._registered)


class _Method:
    def __init__(self, fn: Callable[..., Any]) -> None:
        self._fn = fn

    def remote(self, *args: Any, replica: str | None = None) -> Any:
        return self._fn(replica, *args)


class FakeStream:
    """A decode stream as the router sees a Serve response generator: the replica's
    generator runs on its own (as Serve drives it) and its chunks queue up here."""

    _END = object()

    def __init__(self, agen: AsyncIterator[TokenChunk], owner: FakeInstance) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._task = owner.task(self._pump(agen))
        self.cancelled = False

    async def _pump(self, agen: AsyncIterator[TokenChunk]) -> None:
        try:
            async for chunk in agen:
                self._queue.put_nowait(chunk)
            self._queue.put_nowait(self._END)
        except Exception as e:
            self._queue.put_nowait(e)

    def __aiter__(self) -> FakeStream:
        return self

    async def __anext__(self) -> TokenChunk:
        item = await self._queue.get()
        if item is self._END:
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            raise item
        chunk: TokenChunk = item
        return chunk

    def cancel(self) -> None:
        self.cancelled = True
        self._task.cancel()


@dataclass
class FakeInstance:
    """What both fake pools record: every call in order, the requests in flight, and the
    aborts received."""

    name: str
    address: str
    calls: list[str] = field(default_factory=list)
    active: set[str] = field(default_factory=set)
    aborted: list[str] = field(default_factory=list)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def task(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        t = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(t)
        t.add_done_callback(self.tasks.discard)
        return t

    def check_pin(self, replica: str | None) -> None:
        assert replica == self.address, f"{self.name}: call pinned to {replica!r}"

    @property
    def abort(self) -> _Method:
        return _Method(lambda replica, rid: self.task(self._abort(replica, rid)))

    async def _abort(self, replica: str | None, request_id: str) -> None:
        self.check_pin(replica)
        self.calls.append("abort")
        self.aborted.append(request_id)
        self.active.discard(request_id)


@dataclass
class DecodeBehaviour:
    tokens: tuple[int, ...] = (5, 6, 7)  # the whole output: a resumed request goes on
    fail_before_first: BaseException | None = None
    refuse: bool = False  # no room for the transfer: prefill locally
    # the stream breaks with `die_with` once this many chunks went out (the instance
    # died mid-stream)
    die_after: int | None = None
    die_with: BaseException | None = None
    chunk_delay_s: float = 0.0  # between two chunks


class FakeDecode(FakeInstance):
    def __init__(self, transfers: FakeTransfers, name: str = "decode-0") -> None:
        super().__init__(name, f"{name}-replica")
        self.transfers = transfers
        self.behaviour = DecodeBehaviour()
        self.streams: list[FakeStream] = []
        self.requests: list[WorkerRequest] = []
        self.waiting: dict[str, str] = {}  # request id -> the transfer it waits for
        self.failed_early: dict[str, str] = {}  # prefill failures told before the request
        self.told: list[str] = []  # the requests whose prefill failure it was told

    # the handle ------------------------------------------------------------------------

    def options(self, stream: bool = False) -> FakeDecode:
        assert stream
        return self

    @property
    def generate(self) -> _Method:
        return _Method(self._open)

    @property
    def prefill_failed(self) -> _Method:
        return _Method(lambda replica, *a: self.task(self._prefill_failed(replica, *a)))

    # the instance ----------------------------------------------------------------------

    async def _prefill_failed(self, replica: str | None, rid: str, reason: str) -> None:
        """As the real instance: a transfer still awaited ends now; before the request
        came, the failure is remembered for it; after it settled, nothing."""
        self.check_pin(replica)
        self.calls.append("prefill_failed")
        self.told.append(rid)
        tid = self.waiting.get(rid)
        if tid is not None:
            self.transfers.fail(tid, reason)
        elif rid not in self.active and rid not in {r.request_id for r in self.requests}:
            self.failed_early[rid] = reason

    def _open(self, replica: str | None, req: WorkerRequest) -> FakeStream:
        self.check_pin(replica)
        self.calls.append("generate")
        self.requests.append(req)
        stream = FakeStream(self._generate(req), self)
        self.streams.append(stream)
        return stream

    async def _generate(self, req: WorkerRequest) -> AsyncIterator[TokenChunk]:
        rid, b = req.request_id, self.behaviour
        self.active.add(rid)
        plan = req.remote
        tid = plan.transfer_id if plan is not None and not b.refuse else None
        try:
            if b.fail_before_first is not None:
                raise b.fail_before_first
            reason = "decode_full (no free KV blocks)" if plan is not None and b.refuse else ""
            early = self.failed_early.pop(rid, None)
            if tid is not None and early is not None:  # refused: its prefill failed already
                reason, tid = f"prefill failed: {early}", None
            if tid is not None and plan is not None:
                reason = await self._wait(rid, tid, plan.timeout_s)
            disagg = tid is not None and not reason
            for sent, i in enumerate(range(_resumed(req, b.tokens), len(b.tokens))):
                if b.die_after is not None and sent >= b.die_after:
                    raise b.die_with or RuntimeError("the instance died")
                token, last = b.tokens[i], i == len(b.tokens) - 1
                final = _final(req, len(b.tokens), disagg, reason) if last else None
                yield TokenChunk(
                    (token,), text_of((token,)), (), last, "length" if last else None, None, final
                )
                await asyncio.sleep(b.chunk_delay_s)
        finally:
            if tid is not None:
                self.transfers.end(tid)
            self.active.discard(rid)

    async def _wait(self, rid: str, tid: str, timeout_s: float) -> str:
        """Until the transfer lands: "" then, else why not."""
        event = self.transfers.register(tid)
        self.waiting[rid] = tid
        try:
            await asyncio.wait_for(event.wait(), timeout_s)
        except TimeoutError:
            return f"transfer failed: timed out after {timeout_s:g}s"
        finally:
            self.waiting.pop(rid, None)
        failure = self.transfers.failures.get(tid)
        return f"prefill failed: {failure}" if failure is not None else ""


def text_of(tokens: tuple[int, ...]) -> str:
    """The fake model's text of its tokens."""
    return "".join(f"t{t}" for t in tokens)


def _resumed(req: WorkerRequest, tokens: tuple[int, ...]) -> int:
    """Where a resumed request goes on, after checking that it resumes this output with
    the text the client has."""
    if req.resume is None:
        return 0
    done = req.resume.output_token_ids
    assert done == tokens[: len(done)], f"resumed from {done}, not a prefix of {tokens}"
    assert req.resume.text_chars_sent == len(text_of(done)), "resumed with the wrong text"
    return len(done)


def _final(req: WorkerRequest, n: int, disagg: bool, reason: str) -> FinalStats:
    return FinalStats(
        prompt_tokens=len(req.prompt_token_ids),
        completion_tokens=n,
        cached_prompt_tokens=0,
        queue_s=0.001,
        prefill_s=0.0 if disagg else 0.004,
        kv_transfer_s=0.002 if disagg else 0.0,
        tpot_s=0.001,
        disaggregated=disagg,
        fallback_reason=reason,
        fallback=_kind(reason),
    )


def _kind(reason: str) -> FallbackReason | None:
    """As the decode worker names its fallbacks: a refused transfer, or a failed one."""
    if not reason:
        return None
    if reason.startswith("decode_full"):
        return FallbackReason.DECODE_FULL
    if reason.startswith("prefill failed"):
        return FallbackReason.PREFILL_FAILED
    return FallbackReason.TRANSFER_FAILED


@dataclass
class PrefillBehaviour:
    delay_s: float = 0.0
    fail: BaseException | None = None  # the call raises
    refused: bool = False  # the decode side refused: ok=False
    failed_send: bool = False  # its send failed: ok=False, and the transfer never lands
    stall_s: float | None = None  # never completes the transfer; answers after this
    answer_delay_s: float = 0.0  # between completing the transfer and answering


class FakePrefill(FakeInstance):
    def __init__(self, transfers: FakeTransfers, name: str = "prefill-0") -> None:
        super().__init__(name, f"{name}-replica")
        self.transfers = transfers
        self.behaviour = PrefillBehaviour()

    @property
    def prefill(self) -> _Method:
        return _Method(lambda replica, preq: self.task(self._prefill(replica, preq)))

    async def _prefill(self, replica: str | None, preq: PrefillRequest) -> PrefillOutcome:
        self.check_pin(replica)
        self.calls.append("prefill")
        b = self.behaviour
        self.active.add(preq.request_id)
        try:
            await asyncio.sleep(b.delay_s)
            if b.fail is not None:
                raise b.fail
            if b.stall_s is not None:
                await asyncio.sleep(b.stall_s)
                return PrefillOutcome(ok=False, reason="transfer timed out on the sender")
            if b.refused:
                return PrefillOutcome(ok=False, reason="transfer failed: receiver refused it")
            if b.failed_send:
                return PrefillOutcome(ok=False, reason="transfer failed: connection reset")
            self.transfers.complete(preq.transfer_id)
            await asyncio.sleep(b.answer_delay_s)
            return PrefillOutcome(
                ok=True, prefill_s=0.003, cached_prompt_tokens=0, kv_transfer_s=0.001
            )
        finally:
            self.active.discard(preq.request_id)


class FakeDecodePool:
    """Several fake decode instances behind one handle, as Serve's pinned router
    reaches them: each call goes to the instance its pin names."""

    def __init__(self, *instances: FakeDecode) -> None:
        self.by_address = {i.address: i for i in instances}

    def options(self, stream: bool = False) -> FakeDecodePool:
        return self

    @property
    def generate(self) -> _Method:
        return _Method(lambda replica, *a: self._at(replica).generate.remote(*a, replica=replica))

    @property
    def abort(self) -> _Method:
        return _Method(lambda replica, *a: self._at(replica).abort.remote(*a, replica=replica))

    @property
    def prefill_failed(self) -> _Method:
        return _Method(
            lambda replica, *a: self._at(replica).prefill_failed.remote(*a, replica=replica)
        )

    def _at(self, replica: str | None) -> FakeDecode:
        assert replica in self.by_address, f"no fake decode instance {replica!r}"
        return self.by_address[replica]


async def settle(*instances: FakeInstance) -> None:
    """Let background calls (aborts, late prefills, stream closes) run to their end."""
    for _ in range(100):
        pending = [t for inst in instances for t in inst.tasks]
        if not pending:
            return
        await asyncio.wait(pending, timeout=5.0)
    raise AssertionError("background calls never settled")


def assert_idle(transfers: FakeTransfers, *instances: FakeInstance) -> None:
    """The leak check: nothing in flight on any fake instance or transfer."""
    for inst in instances:
        assert not inst.active, f"{inst.name} still holds {inst.active}"
        assert not inst.tasks, f"{inst.name} has calls still running"
    assert transfers.num_registered == 0, "a transfer is still registered"
    assert not transfers.failures, "a transfer failure is still recorded"
