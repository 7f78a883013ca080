"""An abort ends the request's stream on a real decode replica (`DecodeWorker` over a
random tiny Llama, registered in a real redis-server), even when the stream's reader is
suspended between two chunks, where Serve's cancellation of the call cannot reach it:
the replica keeps no stream, request or block of the request afterwards."""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator
from pathlib import Path
from typing import Any

import pytest
from live_api import LiveRouter, live_router

from cluster.redis_server import RedisServer
from engine import SamplingParams
from worker.errors import RequestAborted
from worker.messages import WorkerRequest

PROMPT = tuple(range(100, 140))


@pytest.fixture(scope="module")
def live(tiny_model_dir: Path, redis_server: RedisServer) -> Iterator[LiveRouter]:
    with live_router(tiny_model_dir, redis_server.url) as router:
        yield router


def _request(rid: str) -> WorkerRequest:
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    return WorkerRequest(rid, PROMPT, params, arrival_wall=time.time())


async def _first_then_abort(live: LiveRouter, rid: str) -> tuple[Any, int, Any]:
    gen: AsyncGenerator[Any, None] = live.worker.generate(_request(rid))
    first = await gen.__anext__()  # the reader now sits between two chunks
    await live.worker.abort(rid)
    streams = (await live.worker.state()).num_streams
    try:
        rest: Any = await gen.__anext__()
    except RequestAborted as e:
        rest = e
    return first, streams, rest


def test_an_abort_ends_a_suspended_readers_stream(live: LiveRouter) -> None:
    first, streams, rest = live.on_loop(_first_then_abort(live, "suspended"))
    assert first.token_ids and not first.finished
    assert streams == 0  # gone at the abort, not when the collector gets to the reader
    assert isinstance(rest, RequestAborted), rest


async def _dropped_after_first(live: LiveRouter, rid: str) -> int:
    gen: AsyncGenerator[Any, None] = live.worker.generate(_request(rid))
    await gen.__anext__()
    await gen.aclose()  # what Serve does to a call it dropped: closes the outer generator
    state = await live.worker.state()
    return state.num_streams


def test_closing_the_replicas_generator_closes_the_request(live: LiveRouter) -> None:
    assert live.on_loop(_dropped_after_first(live, "dropped")) == 0
    live.assert_idle()
