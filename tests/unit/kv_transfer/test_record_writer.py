"""The receiver's registration records are written off the caller's thread, in order,
and a withdraw the store could not take is tried again once it answers."""

from __future__ import annotations

import time
from collections.abc import Callable

from kv_transfer.registration import RecordWriter, Registration, registration_key
from kv_transfer.rendezvous import MemoryRendezvous


class FlakyStore(MemoryRendezvous):
    """The in-process store, unreachable while `down` is set (as a paused Redis)."""

    def __init__(self) -> None:
        super().__init__()
        self.down = False

    def publish(self, key: str, value: str, ttl_s: float) -> None:
        if self.down:
            raise TimeoutError("Timeout reading from socket")
        super().publish(key, value, ttl_s)

    def withdraw(self, key: str, value: str) -> None:
        if self.down:
            raise TimeoutError("Timeout reading from socket")
        super().withdraw(key, value)


def _until(cond: Callable[[], bool], timeout_s: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.01)
    return False


def test_records_are_written_in_order_off_the_callers_thread() -> None:
    store = FlakyStore()
    writer = RecordWriter(store, "decode-0", 0, ttl_s=60.0)
    key = registration_key("decode-0", 0, "t1")
    writer.publish("t1", Registration.OPEN)
    assert _until(lambda: store.lookup(key) == "open")
    writer.publish("t2", Registration.OPEN)
    writer.withdraw("t2")  # never overtakes its publish
    writer.withdraw("t1")
    writer.close()
    assert store.keys() == []


def test_a_withdraw_the_store_missed_is_tried_again_when_it_answers() -> None:
    store = FlakyStore()
    writer = RecordWriter(store, "decode-0", 0, ttl_s=60.0, retry_s=0.05)
    writer.publish("t1", Registration.OPEN)
    key = registration_key("decode-0", 0, "t1")
    assert _until(lambda: store.lookup(key) == "open")
    store.down = True
    began = time.monotonic()
    writer.withdraw("t1")  # returns at once: the caller never waits on the store
    assert time.monotonic() - began < 0.5
    time.sleep(0.2)
    assert store.lookup(key) == "open"
    store.down = False
    assert _until(lambda: store.keys() == [])
    writer.close()
