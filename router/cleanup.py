"""The calls a request leaves behind, each pinned to one instance, in the background and
bounded, so that they complete even when the client's cancellation interrupts the call
that started them:

    abort(rid, decode, prefill)       free the request's blocks and transfers on every
                                      instance involved (a stream that did not finish,
                                      or a prefill that failed)
    prefill_failed(rid, decode, why)  tell the decode instance that the request's remote
                                      KV will not come (the prefill call raised, its
                                      instance died, or it reported a failed transfer),
                                      so that it recomputes the prompt now instead of at
                                      the transfer's timeout

A failed call is logged: the instance's own bounds free what it held.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Mapping
from typing import Any

from router.pinning import PIN_KWARG
from router.policy import Candidate

logger = logging.getLogger(__name__)


class Cleanups:
    def __init__(
        self, decode: Any, prefill: Any | None, pools: Mapping[str, Any], timeout_s: float
    ) -> None:
        """`decode`, `prefill`: the pools' default handles; `pools`: every pool's handle
        by name (a switchable instance is reached through its own pool's)."""
        self._decode, self._prefill, self._pools = decode, prefill, pools
        self._timeout_s = timeout_s
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def num_pending(self) -> int:
        return len(self._tasks)

    def handle(self, target: Candidate, default: Any) -> Any:
        """The handle of the deployment that serves `target`."""
        return self._pools.get(target.pool, default)

    def abort(self, rid: str, decode: Candidate | None, prefill: Candidate | None) -> None:
        calls = []
        if decode is not None:
            handle = self.handle(decode, self._decode)
            calls.append(handle.abort.remote(rid, **{PIN_KWARG: decode.address}))
        if prefill is not None and self._prefill is not None:
            handle = self.handle(prefill, self._prefill)
            calls.append(handle.abort.remote(rid, **{PIN_KWARG: prefill.address}))
        self._spawn(self._await(f"aborting {rid}", calls))

    def prefill_failed(self, rid: str, decode: Candidate, reason: str) -> None:
        handle = self.handle(decode, self._decode)
        call = handle.prefill_failed.remote(rid, reason, **{PIN_KWARG: decode.address})
        self._spawn(self._await(f"telling {decode.instance_id} of {rid}'s failed prefill", [call]))

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _await(self, what: str, calls: list[Any]) -> None:
        for call in calls:
            try:
                await asyncio.wait_for(call, self._timeout_s)
            except Exception as e:
                logger.warning("%s: %s", what, e)
