"""Per-transfer registration in the rendezvous store: the decode side may register a
transfer after the prefill side starts sending it.

A receiver rank publishes `OPEN` under the transfer's key once `expect` accepted it
(its blocks are reserved) and withdraws it once the transfer is terminal, or publishes
`REFUSED` when it will not take it. Before its first slice to a receiver rank, a sender
waits, bounded, for that rank's record: `OPEN` lets it send; `REFUSED` fails the
transfer at once (the sender withdraws the record it consumed), and so does no record
by the bound. Records also expire by themselves (`ttl_s`).
"""

from __future__ import annotations

import enum
import logging
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


def withdraw(store: RendezvousStore, instance: str, rank: int, transfer_id: str) -> None:
    """Remove a terminal transfer's OPEN record (best effort: it expires anyway)."""
    key = registration_key(instance, rank, transfer_id)
    try:
        store.withdraw(key, Registration.OPEN.value)
    except Exception as e:
        logger.warning("withdrawing transfer %s: %s", transfer_id, e)


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
