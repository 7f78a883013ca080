"""Waiting on an event loop for transfers that end on other threads.

A sender or receiver makes a transfer terminal on its pump or transport threads; a
coroutine that waits for that end registers a waiter first and is woken by the
terminal callback (`ended`), through its own event loop: no polling.

    waits = EndWaits()                       on_end=waits.ended for the sender/receiver
    async with waits.waiting(transfer_id) as ended:
        ... check the status once (it may be terminal already) ...
        await ended.wait(timeout_s)          True once ended, False at the timeout
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator

from kv_transfer.base import TransferStatus


class EndWait:
    def __init__(self) -> None:
        self._event = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    def wake(self) -> None:
        """Any thread."""
        with contextlib.suppress(RuntimeError):  # the loop closed: nobody waits
            self._loop.call_soon_threadsafe(self._event.set)

    @property
    def ended(self) -> bool:
        return self._event.is_set()

    async def wait(self, timeout_s: float) -> bool:
        try:
            await asyncio.wait_for(self._event.wait(), max(0.0, timeout_s))
        except TimeoutError:
            return False
        return True


class EndWaits:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._waits: dict[str, EndWait] = {}

    def ended(self, transfer_id: str, status: TransferStatus) -> None:
        """The transfer is terminal (any thread; never blocks)."""
        with self._lock:
            wait = self._waits.get(transfer_id)
        if wait is not None:
            wait.wake()

    @contextlib.asynccontextmanager
    async def waiting(self, transfer_id: str) -> AsyncIterator[EndWait]:
        wait = EndWait()
        with self._lock:
            if transfer_id in self._waits:
                raise ValueError(f"transfer {transfer_id!r} is already awaited")
            self._waits[transfer_id] = wait
        try:
            yield wait
        finally:
            with self._lock:
                self._waits.pop(transfer_id, None)

    def __len__(self) -> int:
        with self._lock:
            return len(self._waits)
