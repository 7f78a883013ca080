"""The calls every replica that decodes answers alike: the decode pool's
(`DecodeWorker`) and the switchable pools' (`DualWorker`).

`DecodingReplica` adds them to `worker.replica.PoolReplica`. A deployment builds its
`WorkerRuntime` as `_rt` and its `Generator` as `_gen` in `__init__`. Each call first
checks that a pinned call reached the replica it named.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from decode_worker.generator import Generator
from worker.engine_loop import COMMAND_TIMEOUT_S
from worker.messages import TokenChunk, WorkerRequest
from worker.replica import PoolReplica


class DecodingReplica(PoolReplica):
    _gen: Generator

    async def generate(
        self, request: WorkerRequest, replica: str | None = None
    ) -> AsyncIterator[TokenChunk]:
        """One request's TokenChunks, until the finished one (`Generator.generate`)."""
        self._rt.check_pin(replica)
        # Closed here, not left to the collector, when Serve drops this generator.
        async with contextlib.aclosing(self._gen.generate(request)) as chunks:
            async for chunk in chunks:
                yield chunk

    async def prefill_failed(
        self, request_id: str, reason: str, replica: str | None = None
    ) -> None:
        """The router saw the request's remote prefill fail: recompute it now."""
        self._rt.check_pin(replica)
        fail = self._gen.prefill_failed
        await self._rt.loop.call(lambda: fail(request_id, reason), COMMAND_TIMEOUT_S)
