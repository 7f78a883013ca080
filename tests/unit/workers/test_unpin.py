"""The prefill worker releases a transfer's block pins only once no sender reads them."""

from __future__ import annotations

import asyncio
import time

import pytest

from prefill_worker.deployment import release_when_unread


class Senders:
    """`reading` answers from a flag the test flips, counting its calls."""

    def __init__(self, reading: bool) -> None:
        self.still_reading = reading
        self.calls = 0
        self.released_at: float | None = None

    async def reading(self) -> bool:
        self.calls += 1
        return self.still_reading

    def release(self) -> None:
        assert self.released_at is None, "released twice"
        self.released_at = time.monotonic()


def test_pins_wait_for_the_sends_in_flight() -> None:
    senders = Senders(reading=True)

    async def run() -> float:
        task = asyncio.create_task(release_when_unread("t", senders.reading, senders.release))
        await asyncio.sleep(0.1)
        assert senders.released_at is None and senders.calls > 1  # still read: held
        over = time.monotonic()
        senders.still_reading = False
        await asyncio.wait_for(task, 5.0)
        return over

    over = asyncio.run(run())
    assert senders.released_at is not None and senders.released_at >= over


def test_pins_of_a_transfer_nothing_reads_go_at_once() -> None:
    senders = Senders(reading=False)
    asyncio.run(release_when_unread("t", senders.reading, senders.release))
    assert senders.calls == 1 and senders.released_at is not None


def test_pins_go_after_the_bound_or_when_a_rank_cannot_answer(
    caplog: pytest.LogCaptureFixture,
) -> None:
    stuck = Senders(reading=True)
    asyncio.run(release_when_unread("t1", stuck.reading, stuck.release, timeout_s=0.05))
    assert stuck.released_at is not None
    assert "still read its blocks" in caplog.text

    async def dead_rank() -> bool:
        raise RuntimeError("actor died")

    gone = Senders(reading=True)
    asyncio.run(release_when_unread("t2", dead_rank, gone.release))
    assert gone.released_at is not None
    assert "unpinning without every rank" in caplog.text
