"""Per-transfer registration in the rendezvous store: the decode side may register a
transfer after the prefill side starts sending it.

A receiver rank publishes `OPEN` under the transfer's key once `expect` accepted it
(its blocks are reserved) and withdraws it once the transfer is terminal, or publishes
`REFUSED` when it will not take it. Before its first slice to a receiver rank, a sender
waits, bounded, for that rank's record: `OPEN` lets it send; `REFUSED` fails the
transfer at once (the sender withdraws the record it consumed), and so does no record
by the bound. Records also expire by themselves (`ttl_s`).

A receiver writes its records through a `RecordWriter`: one thread per receiver rank
that writes them in order, so that the thread that expects a transfer (the decode
engine's) never waits on the store, even while it is unreachable; the sender's bounded
wait covers a record that comes late or never.
"""

from __future__ import annotations

import enum
import logging
import queue
import threading
import time
from collections.abc import Callable

from kv_transfer.rendezvous import RendezvousStore

logger = logging.getLogger(__name__)

_FIRST_POLL_S = 0.0002
_MAX_POLL_S = 0.005


class Registration(enum.StrEnum):
    OPEN = "open"
    REFUSED = "refused"


def registration_key(instance: str, rank: int, transfer_id: str) -> str:
    """Where receiver rank `rank` of `instance` registers a transfer (transfer ids are
    assigned by the router, unique per request)."""
    return f"xfer:{instance}:{rank}:{transfer_id}"


def publish(
    store: RendezvousStore,
    instance: str,
    rank: int,
    transfer_id: str,
    state: Registration,
    ttl_s: float,
) -> None:
    """Best effort: a record that cannot be written leaves the sender to its bound."""
    try:
        store.publish(registration_key(instance, rank, transfer_id), state.value, ttl_s)
    except Exception as e:
        logger.warning("publishing transfer %s as %s: %s", transfer_id, state.value, e)


def withdraw(store: RendezvousStore, instance: str, rank: int, transfer_id: str) -> bool:
    """Remove a terminal transfer's OPEN record (best effort: it expires anyway); False
    when the store could not be reached."""
    key = registration_key(instance, rank, transfer_id)
    try:
        store.withdraw(key, Registration.OPEN.value)
    except Exception as e:
        logger.warning("withdrawing transfer %s: %s", transfer_id, e)
        return False
    return True


class RecordWriter:
    """Writes one receiver rank's registration records on its own thread, in the order
    they were asked for (a withdraw never overtakes its publish). Best effort: a write
    that fails is logged, and once `max_pending` writes wait, new ones are dropped
    (every record expires by itself). A withdraw that fails is tried again every
    `retry_s` until the store answers: a write that timed out while the store was
    paused may still be carried out when it resumes, after a later withdraw."""

    def __init__(
        self,
        store: RendezvousStore,
        instance: str,
        rank: int,
        ttl_s: float,
        max_pending: int = 4096,
        retry_s: float = 1.0,
    ) -> None:
        self._store, self._instance, self._rank, self._ttl = store, instance, rank, ttl_s
        self._retry_s = retry_s
        self._unwithdrawn: set[str] = set()
        self._queue: queue.Queue[tuple[str, Registration | None] | None] = queue.Queue(max_pending)
        self._thread = threading.Thread(
            target=self._run, name=f"kv-records-{instance}-{rank}", daemon=True
        )
        self._thread.start()

    def publish(self, transfer_id: str, state: Registration) -> None:
        self._put((transfer_id, state))

    def withdraw(self, transfer_id: str) -> None:
        self._put((transfer_id, None))

    def _put(self, item: tuple[str, Registration | None]) -> None:
        try:
            self._queue.put_nowait(item)
        except queue.Full:
            logger.warning("transfer %s: registration record dropped (store backlog)", item[0])

    def _run(self) -> None:
        last_retry = time.monotonic()
        while True:
            if self._unwithdrawn and time.monotonic() - last_retry >= self._retry_s:
                self._withdraw_again()
                last_retry = time.monotonic()
            try:
                item = self._queue.get(timeout=self._retry_s if self._unwithdrawn else None)
            except queue.Empty:
                continue
            if item is None:
                self._withdraw_again()
                return
            transfer_id, state = item
            if state is None:
                if not withdraw(self._store, self._instance, self._rank, transfer_id):
                    self._unwithdrawn.add(transfer_id)
            else:
                publish(self._store, self._instance, self._rank, transfer_id, state, self._ttl)

    def _withdraw_again(self) -> None:
        for transfer_id in sorted(self._unwithdrawn):
            if not withdraw(self._store, self._instance, self._rank, transfer_id):
                return  # the store is still away: next time
            self._unwithdrawn.discard(transfer_id)

    def close(self, timeout_s: float = 5.0) -> None:
        """Write what is queued (within `timeout_s`), then stop."""
        deadline = time.monotonic() + timeout_s
        try:
            self._queue.put(None, timeout=timeout_s)
        except queue.Full:
            logger.warning(
                "registration records of %s/%d left unwritten", self._instance, self._rank
            )
            return
        self._thread.join(max(0.0, deadline - time.monotonic()))


def wait_open(
    store: RendezvousStore,
    instance: str,
    rank: int,
    transfer_id: str,
    deadline: float,
    cancelled: Callable[[], bool] = lambda: False,
) -> str | None:
    """None once the receiver rank registered the transfer as open; otherwise why not
    (refused, already ended, `cancelled()`, or no record by `deadline`, a
    time.monotonic())."""
    key = registration_key(instance, rank, transfer_id)
    pause = _FIRST_POLL_S
    while not cancelled():
        try:
            value = store.lookup(key)
        except Exception as e:
            return f"cannot read the registration of {instance}/{rank}: {e}"
        if value == Registration.OPEN:
            return None
        if value is not None:
            if value == Registration.REFUSED:
                store.withdraw(key, value)  # consumed: this sender is its only reader
            return f"receiver {instance}/{rank} {value} the transfer"
        if time.monotonic() >= deadline:
            return f"receiver {instance}/{rank} did not register the transfer in time"
        time.sleep(min(pause, max(0.0, deadline - time.monotonic())))
        pause = min(2 * pause, _MAX_POLL_S)
    return "the transfer ended while waiting for its registration"
