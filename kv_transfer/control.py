"""Control channels: one stream socket per (sender rank, receiver rank) pair.

The socket carries fixed-size messages (header.py) from sender to receiver: a HELLO,
then DATA/END/ABORT headers numbered by `seq`. Payloads travel on the transport's own
data path; the control channel only says what arrives and where it belongs. A closed
socket is how each side learns that the other one died.

Receiver side, `ControlServer`:

    accept thread     accepts connections on the listening socket, at most
                      `max_connections` at once (more are closed at once, logged);
                      `check_peer` may refuse one by its socket (shm: SO_PEERCRED)
    reader thread     one per connection:
                        HELLO and its seal (auth.py), within the handshake timeout;
                        a bad seal is refused with a one-line warning
                        -> open_session(peer)
                        loop: header -> seq check -> DATA: inbox.prepare, then
                        session.start posts the receive at once (up to `window`
                        posted or waiting to land); without `pipelined` (payloads
                        already in place), inbox.land right away
                        EOF, error, bad message, or no message for
                        `idle_timeout_s` -> inbox.on_peer_lost, session.close()
    waiter thread     with `pipelined`, one per connection: finishes each posted
                      receive in order (inbox.written for a direct one)
    lander thread     with `pipelined`, one per connection: inbox.land for each
                      received message in order, while later payloads arrive

Sender side, `ControlClient`: connect, send the HELLO (sealed when the transport has
the cluster secret), then `send` headers with a bounded blocking write. A client idle
for half the server's idle timeout is `stale`: its link reports itself broken, so the
sender reconnects instead of writing into a connection the server may have closed.
TCP sockets have keepalive on both ends, so a vanished peer is noticed while idle.
Addresses are `tcp://host:port` or `unix:@name` (a Linux abstract socket, which needs
no file and vanishes with its owner).
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time

from kv_transfer.auth import SEAL_SIZE, AuthError, HelloAuth
from kv_transfer.base import Parallelism, ProtocolError, RankId, TransferError
from kv_transfer.guard import (
    DEFAULT_IDLE_TIMEOUT_S,
    ServerGuard,
    Throttle,
    describe_peer,
    tune_socket,
)
from kv_transfer.header import MESSAGE_SIZE, Header, Hello, MessageKind, decode
from kv_transfer.lander import Finish, Lander, OpenSession, Pending, Session, finish_receive
from kv_transfer.transport import Inbox, Peer

__all__ = ["ControlClient", "ControlServer", "Finish", "OpenSession", "Session", "listen"]

logger = logging.getLogger(__name__)


def _socket_for(address: str) -> tuple[socket.socket, str | tuple[str, int]]:
    if address.startswith("tcp://"):
        host, _, port = address[len("tcp://") :].rpartition(":")
        if not host or not port.isdigit():
            raise TransferError(f"bad control address {address!r}")
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        tune_socket(sock)
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
    """The sender's end of a control channel.

    `auth` seals the HELLO for `address` (the receiver's published address). The
    client is `stale` once nothing was sent for `max_idle_s` (half the server's idle
    timeout, so the server never closes a connection the client still trusts).
    """

    def __init__(
        self,
        address: str,
        hello: Hello,
        timeout_s: float,
        auth: HelloAuth | None = None,
        max_idle_s: float = DEFAULT_IDLE_TIMEOUT_S / 2,
    ) -> None:
        self.address = address
        self._lock = threading.Lock()
        self._max_idle_s = max_idle_s
        self._sock, target = _socket_for(address)
        self._sock.settimeout(timeout_s)  # bounds connect and every write
        packed = hello.pack()
        opening = packed + auth.seal(address, packed) if auth is not None else packed
        try:
            self._sock.connect(target)
            self._sock.sendall(opening)
        except OSError as e:
            self._sock.close()
            raise TransferError(f"cannot connect to {address}: {e}") from e
        self._last_send = time.monotonic()

    @property
    def stale(self) -> bool:
        return time.monotonic() - self._last_send > self._max_idle_s

    def send(self, message: bytes) -> None:
        with self._lock:
            try:
                self._sock.sendall(message)
            except OSError as e:
                raise TransferError(f"control channel to {self.address} failed: {e}") from e
            self._last_send = time.monotonic()

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
        guard: ServerGuard | None = None,
    ) -> None:
        self._listener, self._inbox, self._open = listener, inbox, open_session
        self._pipelined, self._window = pipelined, window
        self._handshake_timeout = handshake_timeout_s
        self._guard = guard or ServerGuard()
        self._name = name
        self._throttle = Throttle()
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
            if not self._admit(sock):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
                continue
            tune_socket(sock)
            thread = threading.Thread(
                target=self._serve, args=(sock,), name=f"kv-conn-{self._name}", daemon=True
            )
            with self._lock:
                self._conns[sock] = thread
            thread.start()

    def _admit(self, sock: socket.socket) -> bool:
        """Whether a new connection may stay: under the cap, and a peer `check_peer`
        accepts. A refusal is logged (throttled)."""
        with self._lock:
            full = len(self._conns) >= self._guard.max_connections
        if full:
            self._throttle.warn(
                "cap",
                "%s: refused a control connection from %s: %d connections open (the cap)",
                self._name,
                describe_peer(sock),
                self._guard.max_connections,
            )
            return False
        if self._guard.check_peer is not None:
            try:
                self._guard.check_peer(sock)
            except (AuthError, OSError) as e:
                self._throttle.warn(
                    "peer",
                    "%s: refused a control connection from %s: %s",
                    self._name,
                    describe_peer(sock),
                    e,
                )
                return False
        return True

    def _handshake(self, sock: socket.socket) -> Peer | None:
        """Read and check the HELLO (and its seal); None when refused (logged)."""
        sock.settimeout(self._handshake_timeout)
        raw = _recv_exact(sock, MESSAGE_SIZE)
        if raw is None:
            raise ProtocolError("connection closed before its HELLO")
        auth = self._guard.auth
        if auth is not None:
            try:
                seal = self._read_seal(sock)
                auth.check(self._guard.address, raw, seal)
            except AuthError as e:
                self._throttle.warn(
                    "auth",
                    "%s: refused a control connection from %s: %s",
                    self._name,
                    describe_peer(sock),
                    e,
                )
                return None
        hello = decode(raw)
        if not isinstance(hello, Hello):
            raise ProtocolError("connection did not start with HELLO")
        return Peer(
            RankId(hello.instance, hello.rank), Parallelism(hello.tp, hello.pp), hello.token
        )

    def _read_seal(self, sock: socket.socket) -> bytes:
        try:
            seal = _recv_exact(sock, SEAL_SIZE)
        except TimeoutError:
            raise AuthError(
                f"HELLO is not sealed (nothing after it for {self._handshake_timeout:g}s)"
            ) from None
        except ProtocolError:
            seal = None
        if seal is None:
            raise AuthError("HELLO is not sealed (the connection closed after it)")
        return seal

    def _serve(self, sock: socket.socket) -> None:
        peer: Peer | None = None
        session: Session | None = None
        lander: Lander | None = None
        reason = "connection closed"
        try:
            peer = self._handshake(sock)
            if peer is None:
                return
            session = self._open(peer)
            if self._pipelined:
                lander = Lander(self._inbox, peer, session, sock, self._name, self._window)
            sock.settimeout(self._guard.idle_timeout_s)  # close() shuts waiting ones down
            self._read_messages(sock, peer, session, lander)
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
            self._hang_up(sock, peer, session, lander, reason)

    def _read_messages(
        self, sock: socket.socket, peer: Peer, session: Session, lander: Lander | None
    ) -> None:
        """Read headers in order until the peer closes or the server does; each DATA
        message's receive is posted, then landed here or by the lander (pipelined)."""
        seq = 0
        while not self._closing.is_set():
            try:
                raw = _recv_exact(sock, MESSAGE_SIZE)
            except TimeoutError:
                raise TransferError(
                    f"idle for over {self._guard.idle_timeout_s:g}s (or a message cut short)"
                ) from None
            if raw is None:
                return
            header = decode(raw)
            if not isinstance(header, Header) or header.seq != seq:
                raise ProtocolError(f"expected message {seq}, got {header}")
            seq += 1
            item = self._start(peer, session, header, lander)
            if lander is not None:
                lander.put(item)
            else:
                payload = finish_receive(self._inbox, item)
                self._inbox.land(peer, header, item.target, payload)
                if payload is not None:
                    session.done(payload)

    def _hang_up(
        self,
        sock: socket.socket,
        peer: Peer | None,
        session: Session | None,
        lander: Lander | None,
        reason: str,
    ) -> None:
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
        self, peer: Peer, session: Session, header: Header, lander: Lander | None
    ) -> Pending:
        """Validate a message and post its receive (a window slot first, when pipelined)."""
        if header.kind is not MessageKind.DATA:
            return Pending(header, None, None)
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
        return Pending(header, target, finish)
