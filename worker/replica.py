"""The calls every pool deployment answers alike, whatever its role: `state`, the
heartbeat drills and Serve's health probe.

`PoolReplica` is the base of `PrefillWorker`, `DecodeWorker` and `DualWorker`. A
deployment builds its `WorkerRuntime` as `_rt` in `__init__` and supplies `_state`, its
`WorkerState` (run on the engine thread, usually through `_worker_state`, which fills
what every replica reports). Like the role's own calls, each call that takes `replica`
first checks that a pinned call reached the replica it named.
"""

from __future__ import annotations

import dataclasses

from worker.engine_loop import COMMAND_TIMEOUT_S
from worker.messages import WorkerState
from worker.runtime import WorkerRuntime


class PoolReplica:
    _rt: WorkerRuntime

    async def state(self, replica: str | None = None) -> WorkerState:
        self._rt.check_pin(replica)
        state = await self._rt.loop.call(self._state, COMMAND_TIMEOUT_S)
        if self._rt.ranks is None:
            return state
        # every rank sends or receives its own KV slices
        others = sum(await self._rt.ranks.acall("num_active"))
        return dataclasses.replace(state, active_transfers=state.active_transfers + others)

    def _state(self) -> WorkerState:
        """This replica's state; runs on the engine thread."""
        raise NotImplementedError

    def _worker_state(
        self,
        *,
        active_transfers: int,
        pending_remote_prefills: int,
        remote_prefill_fallbacks: int,
        transfer_failures: int,
        extra: dict[str, int] | None = None,
    ) -> WorkerState:
        """A `WorkerState` with the engine's, the loop's and the presence's figures and
        the role's transfer counts (on the engine thread)."""
        rt = self._rt
        return WorkerState(
            instance_id=rt.instance_id,
            pool=rt.settings.pool,
            role=rt.settings.role,
            num_requests=rt.engine.num_requests,
            num_streams=rt.loop.num_streams,
            free_blocks=rt.engine.block_pool.num_free,
            total_blocks=rt.engine.block_pool.num_blocks,
            active_transfers=active_transfers,
            pending_remote_prefills=pending_remote_prefills,
            remote_prefill_fallbacks=remote_prefill_fallbacks,
            transfer_failures=transfer_failures,
            heartbeat_running=rt.presence.heartbeat_running,
            extra=extra if extra is not None else {},
        )

    async def suspend_heartbeat(self, replica: str | None = None) -> None:
        """Stop renewing the lease without deregistering (for fault drills)."""
        self._rt.check_pin(replica)
        self._rt.presence.suspend()

    async def resume_heartbeat(self, replica: str | None = None) -> None:
        self._rt.check_pin(replica)
        self._rt.presence.resume()

    def check_health(self) -> None:
        """Serve's periodic probe: raises once the engine thread failed or stopped, or
        once the engine found a TP/PP replica's other ranks unreachable."""
        self._rt.loop.check()
