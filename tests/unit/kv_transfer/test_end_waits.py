"""A coroutine waiting for a transfer's end is woken by the terminal callback from
another thread, without polling; a wait is bounded and each transfer has one waiter."""

from __future__ import annotations

import asyncio
import threading

import pytest

from kv_transfer.base import TransferState, TransferStatus
from kv_transfer.end_waits import EndWaits

DONE = TransferStatus(TransferState.DONE)


def test_an_end_on_another_thread_wakes_the_waiter() -> None:
    waits = EndWaits()

    async def run() -> tuple[bool, bool, float]:
        async with waits.waiting("t") as ended:
            assert not ended.ended
            threading.Timer(0.05, waits.ended, ("t", DONE)).start()
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            woke = await ended.wait(30.0)
            return woke, ended.ended, loop.time() - t0

    woke, ended, waited = asyncio.run(run())
    assert woke and ended
    assert waited < 29.0  # woken, not timed out
    assert len(waits) == 0


def test_a_wait_times_out_and_other_transfers_do_not_wake_it() -> None:
    waits = EndWaits()

    async def run() -> bool:
        async with waits.waiting("t") as ended:
            waits.ended("another", DONE)
            waits.ended("unknown", DONE)
            return await ended.wait(0.05)

    assert asyncio.run(run()) is False
    assert len(waits) == 0


def test_one_waiter_per_transfer() -> None:
    waits = EndWaits()

    async def run() -> None:
        async with waits.waiting("t"):
            with pytest.raises(ValueError, match="already awaited"):
                async with waits.waiting("t"):
                    pass

    asyncio.run(run())
    assert len(waits) == 0
