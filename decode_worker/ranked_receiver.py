"""The decode side's receiver over every rank of a TP/PP replica.

Rank 0 receives its own KV slices; ranks 1..N-1 (`worker.ranks.RankActor`) receive
theirs. `RankedReceiver` makes them one `TransferReceiver`: a transfer is DONE once
every rank's receiver is, and FAILED as soon as one rank's is.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Any

from kv_transfer.base import PENDING, RecvSpec, TransferState, TransferStatus, failed
from kv_transfer.receiver import KVReceiver
from worker.ranks import RemoteRanks, combine

logger = logging.getLogger(__name__)

_HISTORY = 4096  # terminal statuses kept for poll()


class RankedReceiver:
    """A `TransferReceiver` over rank 0's receiver and every other rank's.

    `expect` and `abort` reach every rank before they return (abort's guarantee, that
    no write lands afterwards, must hold on every rank). `poll` never waits: a thread
    polls the other ranks for the transfers in flight, and `poll` combines rank 0's
    live status with their last reports.
    """

    def __init__(self, local: KVReceiver, ranks: RemoteRanks, interval_s: float = 0.002) -> None:
        self._local, self._ranks, self._interval = local, ranks, interval_s
        self._lock = threading.Lock()
        self._remote: dict[str, TransferStatus] = {}  # in flight on the other ranks
        self._ended: OrderedDict[str, TransferStatus] = OrderedDict()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="rank-poller", daemon=True)
        self._thread.start()

    @property
    def endpoint(self) -> Any:
        return self._local.endpoint

    def expect(self, spec: RecvSpec) -> None:
        self._local.expect(spec)
        try:
            self._ranks.call("expect", spec)
        except Exception as e:
            self._local.abort(spec.transfer_id, "another rank cannot expect it")
            self._ranks.send("abort_recv", spec.transfer_id, "another rank cannot expect it")
            raise RuntimeError(f"the other ranks cannot expect the transfer: {e}") from e
        with self._lock:
            self._remote[spec.transfer_id] = PENDING

    def poll(self, transfer_id: str) -> TransferStatus:
        """DONE once every rank is; FAILED as soon as one rank is, and then the transfer
        is aborted on every rank first (a caller that recomputes the prompt into the
        same blocks must not see a late write on any rank)."""
        local = self._local.poll(transfer_id)
        with self._lock:
            remote = self._remote.get(transfer_id)
            ended = self._ended.get(transfer_id)
        if remote is None and ended is None:
            return local
        others = remote if remote is not None else ended
        assert others is not None
        status = combine([local, others])
        if status.state is TransferState.FAILED:
            reason = status.reason or "failed on another rank"
            if remote is not None:
                self.abort(transfer_id, reason)
            elif not local.terminal:
                self._local.abort(transfer_id, reason)
        return status

    def abort(self, transfer_id: str, reason: str = "aborted") -> None:
        self._local.abort(transfer_id, reason)
        try:
            self._ranks.call("abort_recv", transfer_id, reason)
        except Exception:
            logger.exception("aborting %s on the other ranks", transfer_id)
        self._end(transfer_id, failed(reason))

    @property
    def num_active(self) -> int:
        with self._lock:
            return self._local.num_active + len(self._remote)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5.0)
        self._local.close()

    def _end(self, transfer_id: str, status: TransferStatus) -> None:
        with self._lock:
            self._remote.pop(transfer_id, None)
            self._ended[transfer_id] = status
            while len(self._ended) > _HISTORY:
                self._ended.popitem(last=False)

    def _watch(self) -> None:
        while not self._stop.wait(self._interval):
            with self._lock:
                ids = list(self._remote)
            if not ids:
                continue
            try:
                per_rank = self._ranks.call("poll", ids, timeout_s=10.0)
            except Exception as e:
                logger.warning("polling the other ranks failed: %s", e)
                for t in ids:
                    self._end(t, failed(f"another rank is unreachable: {e}"))
                continue
            for i, t in enumerate(ids):
                status = combine([r[i] for r in per_rank])
                if status.terminal:
                    self._end(t, status)
                else:
                    with self._lock:
                        if t in self._remote:
                            self._remote[t] = status
