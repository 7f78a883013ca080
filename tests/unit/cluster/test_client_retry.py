"""The clients send Generate again on UNAVAILABLE before the first chunk, and continue a
stream that broke with UNAVAILABLE after some chunks with a `resume` of what they
have: against a real gRPC server whose Generate fails a set number of times."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest

from cluster.client import AsyncClient, Client, ClientError, RetryPolicy
from protos.pdserve.v1 import pdserve_pb2, pdserve_pb2_grpc


class FlakyGenerate(pdserve_pb2_grpc.PDServeServicer):
    """Fails the first `failures` calls with `code`, after `chunks_first` chunks."""

    def __init__(self, failures: int, code: grpc.StatusCode, chunks_first: int = 0) -> None:
        self.failures = failures
        self.code = code
        self.chunks_first = chunks_first
        self.calls = 0
        self._lock = threading.Lock()

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        with self._lock:
            self.calls += 1
            fail = self.calls <= self.failures
        if fail:
            for i in range(self.chunks_first):
                yield pdserve_pb2.GenerateResponse(request_id="r", token_ids=[i], text="x")
            context.abort(self.code, "the replica went away")
        yield pdserve_pb2.GenerateResponse(request_id="r", token_ids=[7], text="a")
        yield pdserve_pb2.GenerateResponse(
            request_id="r",
            token_ids=[8],
            text="b",
            finish_reason=pdserve_pb2.FINISH_REASON_STOP,
            usage=pdserve_pb2.Usage(prompt_tokens=1, completion_tokens=2),
            timings=pdserve_pb2.Timings(ttft_ms=1.0),
        )


@pytest.fixture
def serve() -> Iterator[Any]:
    servers: list[grpc.Server] = []

    def start(servicer: FlakyGenerate) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        pdserve_pb2_grpc.add_PDServeServicer_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    yield start
    for server in servers:
        server.stop(grace=None)


FAST = RetryPolicy(max_retries=2, backoff_s=0.01, max_backoff_s=0.02)
NO_RESUME = RetryPolicy(max_retries=2, backoff_s=0.01, max_backoff_s=0.02, max_resumes=0)
OUTPUT = tuple(range(20, 30))


def _text(ids: tuple[int, ...]) -> str:
    return "".join(f"<{t}>" for t in ids)


class BreakingStream(pdserve_pb2_grpc.PDServeServicer):
    """Streams OUTPUT one token a message; each of the first calls in `breaks` streams
    that many messages and then fails with UNAVAILABLE (a router replica died). A call
    with `resume` must hold a prefix of OUTPUT and its text, and goes on after it."""

    def __init__(self, breaks: list[int]) -> None:
        self.breaks = list(breaks)
        self.resumes: list[tuple[tuple[int, ...], int]] = []
        self._lock = threading.Lock()

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        done: tuple[int, ...] = ()
        if request.HasField("resume"):
            done = tuple(request.resume.token_ids)
            assert done == OUTPUT[: len(done)] and request.resume.text_chars == len(_text(done))
            self.resumes.append((done, request.resume.text_chars))
        with self._lock:
            cut = self.breaks.pop(0) if self.breaks else None
        for i, t in enumerate(OUTPUT[len(done) :]):
            if cut is not None and i == cut:
                context.abort(grpc.StatusCode.UNAVAILABLE, "the router replica went away")
            last = len(done) + i == len(OUTPUT) - 1
            yield pdserve_pb2.GenerateResponse(
                request_id=f"r{len(done)}",
                token_ids=[t],
                text=_text((t,)),
                finish_reason=pdserve_pb2.FINISH_REASON_LENGTH if last else None,
                usage=pdserve_pb2.Usage(completion_tokens=len(OUTPUT)) if last else None,
                timings=pdserve_pb2.Timings(ttft_ms=1.0) if last else None,
            )


def test_unavailable_before_the_first_chunk_is_retried_and_counted(serve: Any) -> None:
    servicer = FlakyGenerate(2, grpc.StatusCode.UNAVAILABLE)
    with Client(serve(servicer), timeout_s=10, retry=FAST) as c:
        done = c.generate("hi")
        assert done.token_ids == (7, 8) and done.text == "ab"
        assert c.retries == 2
    assert servicer.calls == 3


def test_retries_are_bounded(serve: Any) -> None:
    servicer = FlakyGenerate(3, grpc.StatusCode.UNAVAILABLE)
    with Client(serve(servicer), timeout_s=10, retry=FAST) as c:
        with pytest.raises(ClientError) as e:
            c.generate("hi")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert c.retries == 2
    assert servicer.calls == 3


@pytest.mark.parametrize(
    ("code", "chunks_first"),
    [(grpc.StatusCode.UNAVAILABLE, 1), (grpc.StatusCode.INVALID_ARGUMENT, 0)],
)
def test_no_retry_after_a_chunk_or_on_other_codes(
    serve: Any, code: grpc.StatusCode, chunks_first: int
) -> None:
    servicer = FlakyGenerate(1, code, chunks_first)
    with Client(serve(servicer), timeout_s=10, retry=NO_RESUME) as c:
        got: list[tuple[int, ...]] = []
        with pytest.raises(ClientError) as e:
            for chunk in c.stream("hi"):
                got.append(chunk.token_ids)
        assert e.value.code == code
        assert len(got) == chunks_first and c.retries == 0
    assert servicer.calls == 1


@pytest.mark.parametrize("breaks", [[3], [1, 4], [0, 2]])
def test_a_stream_that_breaks_goes_on_with_what_the_client_has(
    serve: Any, breaks: list[int]
) -> None:
    """Every token once, in order, with its text; a break before the continuation's
    first message is a retry of it."""
    servicer = BreakingStream(breaks)
    with Client(serve(servicer), timeout_s=10, retry=FAST) as c:
        chunks = list(c.stream("hi"))
        assert tuple(t for ch in chunks for t in ch.token_ids) == OUTPUT
        assert "".join(ch.text for ch in chunks) == _text(OUTPUT)
        assert chunks[-1].finish_reason == "length"
        resumes = sum(1 for b in breaks if b > 0)
        assert (c.resumes, c.retries) == (resumes, len(breaks) - resumes)
    had = [sum(b for b in breaks[: i + 1]) for i in range(len(breaks)) if breaks[i] > 0]
    assert [len(done) for done, _ in servicer.resumes] == had


def test_continuations_are_bounded(serve: Any) -> None:
    servicer = BreakingStream([2, 2, 2])
    with Client(serve(servicer), timeout_s=10, retry=FAST) as c:
        got: list[int] = []
        with pytest.raises(ClientError) as e:
            for chunk in c.stream("hi"):
                got.extend(chunk.token_ids)
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        assert tuple(got) == OUTPUT[:6] and c.resumes == 2


def test_the_async_client_continues_a_broken_stream(serve: Any) -> None:
    servicer = BreakingStream([2, 0, 5])
    target = serve(servicer)

    async def run() -> tuple[tuple[int, ...], str, int, int]:
        async with AsyncClient(target, timeout_s=10, retry=FAST) as c:
            done = await c.generate("hi")
            return done.token_ids, done.text, c.resumes, c.retries

    assert asyncio.run(run()) == (OUTPUT, _text(OUTPUT), 2, 1)


def test_the_async_client_retries_the_same_way(serve: Any) -> None:
    servicer = FlakyGenerate(1, grpc.StatusCode.UNAVAILABLE)
    target = serve(servicer)

    async def run() -> tuple[tuple[int, ...], int]:
        async with AsyncClient(target, timeout_s=10, retry=FAST) as c:
            done = await c.generate("hi")
            return done.token_ids, c.retries

    assert asyncio.run(run()) == ((7, 8), 1)
    assert servicer.calls == 2


def test_retry_policy_refuses_bad_settings() -> None:
    with pytest.raises(ValueError, match="max_retries"):
        RetryPolicy(max_retries=-1)
    with pytest.raises(ValueError, match="backoff_s"):
        RetryPolicy(backoff_s=2.0, max_backoff_s=1.0)
    assert RetryPolicy().delay(grpc.StatusCode.UNAVAILABLE, False, 0, left_s=0.05) < 0


def test_a_replica_death_reported_as_internal_reads_as_unavailable(serve: Any) -> None:
    class DeadReplica(FlakyGenerate):
        def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            with self._lock:
                self.calls += 1
                fail = self.calls <= self.failures
            if fail:
                context.abort(
                    grpc.StatusCode.INTERNAL,
                    "The actor 3fc0a1 is unavailable: Actor is unavailable.. The task may or "
                    "may not have been executed on the actor.",
                )
            yield from super().Generate(request, context)

    servicer = DeadReplica(1, grpc.StatusCode.INTERNAL)
    with Client(serve(servicer), timeout_s=10, retry=FAST) as c:
        assert c.generate("hi").token_ids == (7, 8) and c.retries == 1
    servicer = DeadReplica(5, grpc.StatusCode.INTERNAL)
    with Client(serve(servicer), timeout_s=10, retry=FAST) as c:
        with pytest.raises(ClientError) as e:
            c.generate("hi")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE and "actor" in e.value.details
