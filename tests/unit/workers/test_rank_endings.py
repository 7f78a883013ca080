"""How rank 0 of a TP/PP decode replica learns that the other ranks' receivers ended a
transfer: each rank keeps its endings (`Endings`) for a bounded long-poll, and rank 0
settles a transfer once one rank failed it or every rank ended it."""

from __future__ import annotations

import threading
import time

from kv_transfer.base import DONE, TransferState, failed
from worker.rank_role import Endings


def test_a_take_returns_as_soon_as_a_transfer_ends() -> None:
    endings = Endings()
    threading.Timer(0.05, endings.add, ("t1", DONE)).start()
    start = time.monotonic()
    taken = endings.take(timeout_s=30.0)
    assert taken == {"t1": DONE}
    assert time.monotonic() - start < 25.0  # woken by the end, not by the bound
    assert endings.take(timeout_s=0.01) == {}  # each ending is taken once


def test_a_take_is_bounded_and_keeps_what_ends_meanwhile() -> None:
    endings = Endings()
    assert endings.take(timeout_s=0.02) == {}
    endings.add("a", DONE)
    endings.add("b", failed("lost"))
    taken = endings.take(timeout_s=0.0)
    assert set(taken) == {"a", "b"}
    assert taken["b"].state is TransferState.FAILED
