"""Control channels: one stream socket per (sender rank, receiver rank) pair.

The socket carries fixed-size messages (header.py) from sender to receiver: a HELLO,
then DATA/END/ABORT headers numbered by `seq`. Payloads travel on the transport's own
data path; the control channel only says what arrives and where it belongs. A closed
socket is how each side learns that the other one died.

Receiver side, `ControlServer`:

    accept thread     accepts connections on the listening socket
    reader thread     one per connection:
                        HELLO (within the handshake timeout) -> open_session(peer)
                        loop: header -> seq check -> DATA: inbox.prepare, then
                        session.start posts the receive at once (up to `window`
                        posted or waiting to land); without `pipelined` (payloads
                        already in place), inbox.land right away
                        EOF, error or bad message -> inbox.on_peer_lost, session.close()
    waiter thread     with `pipelined`, one per connection: finishes each posted
                      receive in order (inbox.written for a direct one)
    lander thread     with `pipelined`, one per connection: inbox.land for each
                      received message in order, while later payloads arrive

Sender side, `ControlClient`: connect, send the HELLO, then `send` headers with a
bounded blocking write. Addresses are `tcp://host:port` or `unix:@name` (a Linux
abstract socket, which needs no file and vanishes with its owner).
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

from kv_transfer.base import Parallelism, ProtocolError, RankId, TransferError
from kv_transfer.header import MESSAGE_SIZE, Header, Hello, MessageKind, decode
from kv_transfer.transport import Inbox, Peer, Target

logger = logging.getLogger(__name__)


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


def _socket_for(address: str) -> tuple[socket.socket, str | tuple[str, int]]:
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://") :].rpartition(":")
        if not host or not port.isdigit():
            raise TransferError(f"bad control address {address!r}")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock, (host.strip("[]"), int(port))
    if address.startswith("unix:@"):
        return socket.socket(socket.AF_UNIX), "\0" + address[len("unix:@") :]
    raise TransferError(f"unsupported control address {address!r}")


def listen(address: str) -> tuple[socket.socket, str]:
    """A listening socket for `tcp://host:0` or `unix:@name`, and its actual address."""
    sock, target = _socket_for(address)
    try:
        if isinstance(target, tuple):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(target)
        sock.listen(64)
    except OSError as e:
        sock.close()
        raise TransferError(f"cannot listen on {address}: {e}") from e
    if isinstance(target, tuple):
        host, port = sock.getsockname()[:2]
        return sock, f"tcp://{host}:{port}"
    return sock, address


def _recv_exact(sock: socket.socket, n: int) -> bytes | None:
    """`n` bytes, or None on a clean EOF before the first byte."""
    buf = bytearray(n)
    view, got = memoryview(buf), 0
    while got < n:
        k = sock.recv_into(view[got:])
        if k == 0:
            if got == 0:
                return None
            raise ProtocolError(f"connection closed mid-message ({got}/{n} bytes)")
        got += k
    return bytes(buf)


class ControlClient:
    """The sender's end of a control channel."""

    def __init__(self, address: str, hello: Hello, timeout_s: float) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._sock, target = _socket_for(address)
        self._sock.settimeout(timeout_s)  # bounds connect and every write
        try:
            self._sock.connect(target)
            self._sock.sendall(hello.pack())
        except OSError as e:
            self._sock.close()
            raise TransferError(f"cannot connect to {address}: {e}") from e

    def send(self, message: bytes) -> None:
        with self._lock:
            try:
                self._sock.sendall(message)
            except OSError as e:
                raise TransferError(f"control channel to {self.address} failed: {e}") from e

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()


class ControlServer:
    """Accepts sender ranks on `listener` and feeds their messages to `inbox`."""

    def __init__(
        self,
        listener: socket.socket,
        inbox: Inbox,
        open_session: OpenSession,
        handshake_timeout_s: float,
        name: str,
        pipelined: bool = False,
        window: int = 4,
    ) -> None:
        self._listener, self._inbox, self._open = listener, inbox, open_session
        self._pipelined, self._window = pipelined, window
        self._handshake_timeout = handshake_timeout_s
        self._name = name
        self._lock = threading.Lock()
        self._conns: dict[socket.socket, threading.Thread] = {}
        self._closing = threading.Event()
        self._listener.settimeout(0.2)
        self._accept_thread = threading.Thread(
            target=self._accept, name=f"kv-accept-{name}", daemon=True
        )
        self._accept_thread.start()

    @property
    def num_connections(self) -> int:
        with self._lock:
            return len(self._conns)

    def close(self, timeout_s: float) -> None:
        """Stop accepting, end every connection, and join the threads (bounded)."""
        self._closing.set()
        self._accept_thread.join(timeout=timeout_s)
        self._listener.close()
        with self._lock:
            conns = dict(self._conns)
        for sock in conns:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        for thread in conns.values():
            thread.join(timeout=timeout_s)
            if thread.is_alive():
                logger.error("%s: connection thread did not stop", self._name)

    def _accept(self) -> None:
        while not self._closing.is_set():
            try:
                sock, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                if not self._closing.is_set():
                    logger.exception("%s: accept failed", self._name)
                return
            if sock.family != socket.AF_UNIX:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            thread = threading.Thread(
                target=self._serve, args=(sock,), name=f"kv-conn-{self._name}", daemon=True
            )
            with self._lock:
                self._conns[sock] = thread
            thread.start()

    def _serve(self, sock: socket.socket) -> None:
        peer: Peer | None = None
        session: Session | None = None
        lander: _Lander | None = None
        reason = "connection closed"
        try:
            sock.settimeout(self._handshake_timeout)
            raw = _recv_exact(sock, MESSAGE_SIZE)
            hello = decode(raw) if raw is not None else None
            if not isinstance(hello, Hello):
                raise ProtocolError("connection did not start with HELLO")
            peer = Peer(
                RankId(hello.instance, hello.rank), Parallelism(hello.tp, hello.pp), hello.token
            )
            session = self._open(peer)
            if self._pipelined:
                lander = _Lander(self._inbox, peer, session, sock, self._name, self._window)
            sock.settimeout(None)  # idle connections wait; close() shuts them down
            seq = 0
            while not self._closing.is_set():
                raw = _recv_exact(sock, MESSAGE_SIZE)
                if raw is None:
                    break
                header = decode(raw)
                if not isinstance(header, Header) or header.seq != seq:
                    raise ProtocolError(f"expected message {seq}, got {header}")
                seq += 1
                item = self._start(peer, session, header, lander)
                if lander is not None:
                    lander.put(item)
                else:
                    payload = _finish(self._inbox, item)
                    self._inbox.land(peer, header, item.target, payload)
                    if payload is not None:
                        session.done(payload)
        except (TransferError, OSError) as e:
            reason = str(e)
            if not self._closing.is_set():
                logger.warning(
                    "%s: connection from %s ended: %s", self._name, peer.id if peer else "?", e
                )
        except Exception as e:
            reason = f"internal error: {e!r}"
            logger.exception("%s: connection from %s failed", self._name, peer.id if peer else "?")
        finally:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)  # the sender tears its side down
            if lander is not None:
                # what arrived lands before the loss is reported
                reason = lander.close(self._closing) or reason
            if peer is not None:
                self._inbox.on_peer_lost(peer, reason)
            if session is not None:
                session.close()
            sock.close()
            with self._lock:
                self._conns.pop(sock, None)

    def _start(
        self, peer: Peer, session: Session, header: Header, lander: _Lander | None
    ) -> _Pending:
        """Validate a message and post its receive (a window slot first, when pipelined)."""
        if header.kind is not MessageKind.DATA:
            return _Pending(header, None, None)
        target = self._inbox.prepare(peer, header, session.direct_ok)
        reserved = False
        try:
            if lander is not None:
                lander.reserve(self._closing)
                reserved = True
            finish = session.start(header, target)
        except BaseException:
            if reserved and lander is not None:
                lander.unreserve()
            if target is not None and target.direct:
                self._inbox.written(target)
            raise
        return _Pending(header, target, finish)


@dataclass(frozen=True)
class _Pending:
    header: Header
    target: Target | None
    finish: Finish | None  # None for END/ABORT


def _finish(inbox: Inbox, item: _Pending) -> torch.Tensor | None:
    """Wait for a posted receive to stop writing; its staged payload, if any."""
    if item.finish is None:
        return None
    try:
        return item.finish()
    finally:
        if item.target is not None and item.target.direct:
            inbox.written(item.target)


class _Lander:
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
        self._posted: queue.SimpleQueue[_Pending | None] = queue.SimpleQueue()
        self._arrived: queue.SimpleQueue[tuple[_Pending, torch.Tensor | None] | None] = (
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

    def put(self, item: _Pending) -> None:
        self._posted.put(item)

    def _wait_loop(self) -> None:
        while (item := self._posted.get()) is not None:
            try:
                payload = _finish(self._inbox, item)
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
