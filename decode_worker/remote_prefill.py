"""Remote prefills on a decode replica: blocks reserved for a prompt that a prefill
instance computes and pushes into them.

Lifecycle of one remote prefill; every call runs on the engine thread:

    start(request)           reserve the prompt's blocks in the engine and register the
                             transfer with the receiver. Without free blocks or a
                             transfer slot it returns the reason and reserves nothing;
                             the caller then prefills the prompt locally.
    deliver(rid, outcome)    the prefill instance's report, relayed by the router: the
                             first token (and when it was sampled), or a failure
    poll()                   every engine iteration, for each pending transfer:
                               receiver DONE and first token known -> commit: the
                               sequence joins the running batch with its first token
                               receiver FAILED, prefill failed, or no first token by the
                               deadline -> abort the transfer and recompute the prompt
                               locally (engine.fail_remote_prefill), counted as a fallback
    abort(rid)               the transfer first (no write can land after it returns),
                             then the engine request, whose blocks return to the pool

`info(rid)` tells the stream what happened: disaggregated or fallen back, the time from
the first token's sampling to the KV landing here, and the first token's logprob
(sampled remotely, so the local engine never saw it).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from engine import LLMEngine, RequestOutput
from engine.block_pool import OutOfBlocksError
from kv_transfer.base import InstanceRef, RecvSpec, TransferReceiver, TransferState
from worker.messages import PrefillOutcome, WorkerRequest

logger = logging.getLogger(__name__)

# How long past the transfer's own timeout the first token may still arrive.
_FIRST_TOKEN_GRACE_S = 2.0


@dataclass
class _Pending:
    transfer_id: str
    deadline: float  # time.monotonic()
    outcome: PrefillOutcome | None = None
    done_wall: float | None = None  # when the receiver was first seen DONE


@dataclass(frozen=True)
class RemoteInfo:
    disaggregated: bool
    kv_transfer_s: float = 0.0
    fallback_reason: str = ""


class RemotePrefills:
    def __init__(
        self,
        engine: LLMEngine,
        receiver: TransferReceiver,
        post: Callable[[RequestOutput], None],
    ) -> None:
        self._engine = engine
        self._receiver = receiver
        self._post = post
        self._pending: dict[str, _Pending] = {}
        self._lock = threading.Lock()  # guards _info, which streams read
        self._info: dict[str, RemoteInfo] = {}
        self.transfer_failures = 0

    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def info(self, request_id: str) -> RemoteInfo | None:
        with self._lock:
            return self._info.get(request_id)

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._info.pop(request_id, None)

    def _set_info(self, request_id: str, info: RemoteInfo) -> None:
        with self._lock:
            self._info[request_id] = info

    # -- commands ---------------------------------------------------------------------

    def start(self, req: WorkerRequest) -> str:
        """Reserve blocks and expect the transfer; returns "" or why it did not."""
        plan = req.remote
        assert plan is not None
        rid = req.request_id
        try:
            blocks = self._engine.reserve_remote_prefill(
                rid, list(req.prompt_token_ids), req.params
            )
        except OutOfBlocksError as e:
            return f"no free KV blocks ({e})"
        spec = RecvSpec(
            plan.transfer_id,
            tuple(blocks),
            InstanceRef(plan.source_instance, plan.source_parallel),
            0,
            plan.timeout_s,
        )
        try:
            self._receiver.expect(spec)
        except (RuntimeError, ValueError) as e:  # no transfer slot, or a bad spec
            self._engine.abort_request(rid)
            return f"cannot expect the transfer ({e})"
        deadline = time.monotonic() + plan.timeout_s + _FIRST_TOKEN_GRACE_S
        self._pending[rid] = _Pending(plan.transfer_id, deadline)
        self._set_info(rid, RemoteInfo(disaggregated=True))
        return ""

    def deliver(self, request_id: str, outcome: PrefillOutcome) -> None:
        pending = self._pending.get(request_id)
        if pending is not None and pending.outcome is None:
            pending.outcome = outcome

    def abort(self, request_id: str) -> None:
        pending = self._pending.pop(request_id, None)
        if pending is not None:
            self._receiver.abort(pending.transfer_id, "request aborted")
        self._engine.abort_request(request_id)

    # -- every iteration --------------------------------------------------------------

    def poll(self) -> None:
        if not self._pending:
            return
        now = time.monotonic()
        for rid, p in list(self._pending.items()):
            status = self._receiver.poll(p.transfer_id)
            if status.state is TransferState.DONE and p.done_wall is None:
                p.done_wall = time.time()
            if status.state is TransferState.FAILED:
                self.transfer_failures += 1
                self._fall_back(rid, p, f"transfer failed: {status.reason}")
            elif p.outcome is not None and not p.outcome.ok:
                self._fall_back(rid, p, f"prefill failed: {p.outcome.reason}")
            elif p.outcome is not None and p.done_wall is not None:
                self._commit(rid, p, p.outcome, p.done_wall)
            elif now > p.deadline:
                self._fall_back(rid, p, "no first token from the prefill instance in time")

    def _commit(self, rid: str, p: _Pending, outcome: PrefillOutcome, done_wall: float) -> None:
        del self._pending[rid]
        kv_s = max(0.0, done_wall - outcome.first_token_wall)
        self._set_info(rid, RemoteInfo(True, kv_s, ""))
        out = self._engine.commit_remote_prefill(
            rid, outcome.first_token_id, outcome.first_logprob, outcome.sampler_draws
        )
        self._post(out)

    def _fall_back(self, rid: str, p: _Pending, reason: str) -> None:
        del self._pending[rid]
        if not self._receiver.poll(p.transfer_id).terminal:
            self._receiver.abort(p.transfer_id, reason)
        logger.warning("request %s: %s; prefilling locally", rid, reason)
        self._set_info(rid, RemoteInfo(False, 0.0, reason))
        self._engine.fail_remote_prefill(rid)

    def close(self) -> None:
        """Abort everything still pending (replica shutdown)."""
        for rid in list(self._pending):
            self.abort(rid)
