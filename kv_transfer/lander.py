"""A control connection's receive pipeline on the receiver: how posted receives land.

`Session` is a transport's per-connection state (what `ControlServer` calls to post a
DATA payload's receive); `Lander` finishes posted receives and lands their messages in
order, on threads of its own, so the connection's reader can post the next receive as
soon as its header arrives (see its docstring).
"""

from __future__ import annotations

import contextlib
import logging
import queue
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch

from kv_transfer.base import TransferError
from kv_transfer.header import Header
from kv_transfer.transport import Inbox, Peer, Target

logger = logging.getLogger("kv_transfer.control")


Finish = Callable[[], torch.Tensor | None]


class Session(Protocol):
    """A transport's per-connection state on the receiver."""

    direct_ok: bool  # it can receive straight into contiguous destination blocks

    def start(self, header: Header, target: Target | None) -> Finish:
        """Post the receive of a DATA payload; the returned call waits for it.

        The payload goes into `target.views()` when the target is direct (the call then
        returns None), else into staging (returned; None when `target` is None and the
        bytes were dropped, or when the payload is already in place). Either raises
        TransferError or ProtocolError, which ends the connection.
        """
        ...

    def done(self, payload: torch.Tensor) -> None:
        """The payload from `start` has landed; its buffer may be reused."""
        ...

    def close(self) -> None: ...


OpenSession = Callable[[Peer], Session]


@dataclass(frozen=True)
class Pending:
    header: Header
    target: Target | None
    finish: Finish | None  # None for END/ABORT


def finish_receive(inbox: Inbox, item: Pending) -> torch.Tensor | None:
    """Wait for a posted receive to stop writing; its staged payload, if any."""
    if item.finish is None:
        return None
    try:
        return item.finish()
    finally:
        if item.target is not None and item.target.direct:
            inbox.written(item.target)


class Lander:
    """Waits for one connection's posted receives and lands their messages in order, so
    that the reader posts the next receive as soon as its header arrives.

    Two threads: a waiter finishes each posted receive in order (so a direct receive
    reports `written` however slowly landing goes: ending a transfer waits for that) and
    hands the message to the lander, which lands it (checksum, scatter) while later
    payloads arrive. At most `window` receives are posted or waiting to land at once
    (each may hold a staging buffer). A receive that fails ends the connection: the
    socket is shut down, so the reader stops, and nothing after it lands.
    """

    _SLOT_WAIT_S = 0.2  # how often a reader waiting for a window slot checks for close

    def __init__(
        self,
        inbox: Inbox,
        peer: Peer,
        session: Session,
        sock: socket.socket,
        name: str,
        window: int,
    ) -> None:
        self._inbox, self._peer, self._session, self._sock = inbox, peer, session, sock
        self._slots = threading.Semaphore(window)
        self._posted: queue.SimpleQueue[Pending | None] = queue.SimpleQueue()
        self._arrived: queue.SimpleQueue[tuple[Pending, torch.Tensor | None] | None] = (
            queue.SimpleQueue()
        )
        self.error: str | None = None
        self._threads = [
            threading.Thread(target=self._wait_loop, name=f"kv-wait-{name}", daemon=True),
            threading.Thread(target=self._land_loop, name=f"kv-land-{name}", daemon=True),
        ]
        for thread in self._threads:
            thread.start()

    def reserve(self, closing: threading.Event) -> None:
        """Take a window slot for one more posted receive (the reader's thread)."""
        while not self._slots.acquire(timeout=self._SLOT_WAIT_S):
            if closing.is_set() or self.error is not None:
                raise TransferError(self.error or "server closing")

    def unreserve(self) -> None:
        self._slots.release()

    def put(self, item: Pending) -> None:
        self._posted.put(item)

    def _wait_loop(self) -> None:
        while (item := self._posted.get()) is not None:
            try:
                payload = finish_receive(self._inbox, item)
            except Exception as e:
                payload = None
                if self.error is None:
                    self.error = str(e)
                    logger.warning("receive from %s failed: %s", self._peer.id, e)
                    with contextlib.suppress(OSError):
                        self._sock.shutdown(socket.SHUT_RDWR)  # the reader stops
            if self.error is None:
                self._arrived.put((item, payload))
                continue
            if payload is not None:  # nothing after a failed receive lands
                self._session.done(payload)
            if item.finish is not None:
                self._slots.release()
        self._arrived.put(None)

    def _land_loop(self) -> None:
        while (arrived := self._arrived.get()) is not None:
            item, payload = arrived
            try:
                self._inbox.land(self._peer, item.header, item.target, payload)
            except Exception:
                logger.exception(
                    "landing %s from %s failed", item.header.transfer_id, self._peer.id
                )
            finally:
                if payload is not None:
                    self._session.done(payload)
                if item.finish is not None:
                    self._slots.release()

    def close(self, closing: threading.Event) -> str | None:
        """Land what arrived, stop the threads, and return the error that ended the
        connection here, if any."""
        self._posted.put(None)
        for thread in self._threads:
            thread.join(timeout=30.0)
            if thread.is_alive() and not closing.is_set():
                logger.error("%s for %s did not stop", thread.name, self._peer.id)
        return self.error
