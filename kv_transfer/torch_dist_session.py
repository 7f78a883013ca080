"""The receiver's end of a torch_dist pair (kv_transfer/torch_dist.py).

A message announced on the control socket has its receives posted on the pair's group:
straight into its destination blocks when those are one run with all heads, else into
staging that the receiver scatters when it lands; a message with nowhere to land (a
failed or revoked transfer) is still received, into staging, and dropped.
"""

from __future__ import annotations

import threading
from typing import Any, Literal

import torch

from kv_transfer.base import TransferError
from kv_transfer.control import Finish
from kv_transfer.header import Header
from kv_transfer.staging import StagingPool
from kv_transfer.torch_dist_pair import abort_group, wait_work
from kv_transfer.transport import Inbox, Target, message_parts, staging_for

Landing = Literal["direct", "staged", "drained"]


class ReceiveStats:
    """How DATA payloads arrived: straight into their blocks, through staging, or
    drained (received with nowhere to land: a failed or revoked transfer's messages
    still on the wire); and how many of them carried a span of several layers."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.direct = 0
        self.staged = 0
        self.drained = 0
        self.spans = 0

    def count(self, landing: Landing, span: bool) -> None:
        with self._lock:
            if landing == "direct":
                self.direct += 1
            elif landing == "staged":
                self.staged += 1
            else:
                self.drained += 1
            self.spans += span


class RecvSession:
    """The receiver's end of a pair: posts the receives of each announced message,
    straight into the destination blocks or into staging."""

    direct_ok = True

    def __init__(
        self,
        group: Any,
        backend: str,
        device: torch.device,
        inbox: Inbox,
        timeout_s: float,
        pool: StagingPool,
        stats: ReceiveStats,
    ) -> None:
        self._group, self._backend, self._device = group, backend, device
        self._inbox, self._timeout, self._pool = inbox, timeout_s, pool
        self._stats = stats

    def start(self, header: Header, target: Target | None) -> Finish:
        if target is not None and target.direct:
            works = self._post(target.views())
            self._stats.count("direct", span=header.layer_count > 1)

            def finish_direct() -> None:
                self._wait_all(works)

            return finish_direct
        landing: Landing = "drained" if target is None else "staged"
        self._stats.count(landing, span=header.layer_count > 1)
        staging = staging_for(
            header,
            self._inbox.max_payload_bytes,
            self._inbox.max_payload_layers,
            self._device,
            self._pool,
        )
        try:
            works = self._post(message_parts(staging, header.parts))
        except BaseException:
            self._pool.forget(staging)
            raise

        def finish_staged() -> torch.Tensor | None:
            try:
                self._wait_all(works)
            except BaseException:
                self._pool.forget(staging)
                raise
            if target is None:  # nowhere to land: the bytes only had to leave the pair
                self._pool.give(staging)
                return None
            return staging

        return finish_staged

    def _post(self, parts: tuple[torch.Tensor, ...]) -> list[Any]:
        try:
            return [self._group.recv([part], 0, tag) for tag, part in enumerate(parts)]
        except Exception as e:
            raise TransferError(f"recv failed: {e}") from e

    def _wait_all(self, works: list[Any]) -> None:
        try:
            for work in works:
                wait_work(work, self._backend, self._timeout)
        except Exception as e:
            raise TransferError(f"recv failed: {e}") from e

    def done(self, payload: torch.Tensor) -> None:
        self._pool.give(payload)

    def close(self) -> None:
        if self._backend == "nccl":
            abort_group(self._group)
        self._group = None
