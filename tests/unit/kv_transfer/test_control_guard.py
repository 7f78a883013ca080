"""Who a control server lets in: sealed HELLOs (HMAC with the cluster secret, no
replay), the connection cap, the idle timeout, keepalive, the peer's credentials on a
Unix socket, and the receiver's staging bound. Over real sockets, with the control
server's own reader threads."""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch

from kv_transfer.auth import SEAL_SIZE, AuthError, HelloAuth
from kv_transfer.base import ProtocolError, TransferError
from kv_transfer.control import ControlClient, ControlServer, listen
from kv_transfer.guard import ServerGuard, peer_credentials, same_user, tune_socket
from kv_transfer.header import Header, Hello, MessageKind
from kv_transfer.staging import StagingPool
from kv_transfer.transport import Peer, Target

WAIT_S = 5.0
SECRET = b"k" * 32


def _until(cond: Callable[[], bool], limit: float = WAIT_S) -> bool:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def _hello(rank: int = 0) -> Hello:
    return Hello("prefill-0", rank, 2, 1, os.urandom(16))


class _Session:
    direct_ok = False

    def start(self, header: Header, target: Target | None) -> Callable[[], None]:
        return lambda: None

    def done(self, payload: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        pass


class _Inbox:
    """Records the peers that got a session, the messages that landed and the losses."""

    max_payload_bytes = 1 << 20
    max_payload_layers = 4

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.opened: list[Peer] = []
        self.landed: list[int] = []
        self.lost: list[str] = []

    def open(self, peer: Peer) -> _Session:
        with self.lock:
            self.opened.append(peer)
        return _Session()

    def prepare(self, peer: Peer, header: Header, direct_ok: bool) -> Target | None:
        return None

    def written(self, target: Target) -> None:
        pass

    def land(
        self, peer: Peer, header: Header, target: Target | None, payload: torch.Tensor | None
    ) -> None:
        with self.lock:
            self.landed.append(header.seq)

    def on_peer_lost(self, peer: Peer, reason: str) -> None:
        with self.lock:
            self.lost.append(reason)


@contextmanager
def _server(
    address: str = "tcp://127.0.0.1:0", secret: bytes | None = SECRET, **limits: object
) -> Iterator[tuple[ControlServer, _Inbox, str]]:
    listener, bound = listen(address)
    inbox = _Inbox()
    guard = ServerGuard(
        auth=HelloAuth(secret) if secret is not None else None,
        address=bound,
        **limits,  # type: ignore[arg-type]
    )
    server = ControlServer(listener, inbox, inbox.open, WAIT_S, "guarded", guard=guard)
    try:
        yield server, inbox, bound
    finally:
        server.close(timeout_s=WAIT_S)
    assert server.num_connections == 0


def _raw(address: str) -> socket.socket:
    """A plain socket to `address` that sends whatever the test writes."""
    if address.startswith("unix:@"):
        sock = socket.socket(socket.AF_UNIX)
        sock.connect("\0" + address.removeprefix("unix:@"))
    else:
        host, _, port = address.removeprefix("tcp://").rpartition(":")
        sock = socket.create_connection((host, int(port)))
    sock.settimeout(WAIT_S)
    return sock


def _closed_by_server(sock: socket.socket) -> bool:
    """The server closed the connection (EOF or reset) without sending anything."""
    try:
        return sock.recv(1) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


# -- the seal itself ------------------------------------------------------------------


def test_seal_checks_secret_address_fields_time_and_replay() -> None:
    auth, hello = HelloAuth(SECRET), _hello().pack()
    address = "tcp://10.0.0.5:4100"
    seal = auth.seal(address, hello)
    assert len(seal) == SEAL_SIZE
    auth.check(address, hello, seal)
    with pytest.raises(AuthError, match="replayed"):
        auth.check(address, hello, seal)
    fresh = auth.seal(address, hello)
    with pytest.raises(AuthError, match="does not match"):
        HelloAuth(b"x" * 32).check(address, hello, fresh)  # another cluster's secret
    with pytest.raises(AuthError, match="does not match"):
        auth.check("tcp://10.0.0.6:4100", hello, fresh)  # sealed for another receiver
    tampered = bytearray(hello)
    tampered[80] ^= 1
    with pytest.raises(AuthError, match="does not match"):
        auth.check(address, bytes(tampered), fresh)
    with pytest.raises(AuthError, match="not sealed"):
        auth.check(address, hello, b"\0" * SEAL_SIZE)
    old = auth.seal(address, hello, now_ns=time.time_ns() - 120 * 10**9)
    with pytest.raises(AuthError, match="stale"):
        auth.check(address, hello, old)
    auth.check(address, hello, fresh)  # none of the refusals used up its nonce
    with pytest.raises(ValueError, match="at least 16 bytes"):
        HelloAuth(b"short")
    assert "k" * 8 not in repr(HelloAuth(SECRET))


def test_replay_window_forgets_only_expired_nonces() -> None:
    auth, hello, address = HelloAuth(SECRET, max_skew_s=1.0, max_nonces=2), b"h", "unix:@a"
    t0 = time.time_ns()
    seals = [auth.seal(address, hello, now_ns=t0) for _ in range(3)]
    auth.check(address, hello, seals[0], now_ns=t0)
    auth.check(address, hello, seals[1], now_ns=t0)
    with pytest.raises(AuthError, match="too many"):
        auth.check(address, hello, seals[2], now_ns=t0)
    later = t0 + 2 * 10**9  # the first two expired; their seals are stale anyway
    auth.check(address, hello, auth.seal(address, hello, now_ns=later), now_ns=later)
    with pytest.raises(AuthError, match="stale"):
        auth.check(address, hello, seals[0], now_ns=later)


# -- the control server ---------------------------------------------------------------


def test_sealed_hello_opens_a_session() -> None:
    with _server() as (_srv, inbox, address):
        client = ControlClient(address, _hello(), WAIT_S, HelloAuth(SECRET))
        client.send(Header(MessageKind.END, "t", 0, seq=0).pack())
        assert _until(lambda: inbox.landed == [0])
        assert [p.id.instance for p in inbox.opened] == ["prefill-0"]
        client.close()


@pytest.mark.parametrize("how", ["wrong secret", "no seal", "replay"])
def test_bad_hello_is_refused_and_logged(how: str, caplog: pytest.LogCaptureFixture) -> None:
    with _server() as (_srv, inbox, address):
        hello = _hello().pack()
        if how == "wrong secret":
            opening = hello + HelloAuth(b"w" * 32).seal(address, hello)
        elif how == "no seal":  # an unsealed sender: its first header follows the HELLO
            opening = hello + Header(MessageKind.END, "t", 0).pack()
        else:
            opening = hello + HelloAuth(SECRET).seal(address, hello)
            first = _raw(address)
            first.sendall(opening)  # accepted once ...
            assert _until(lambda: len(inbox.opened) == 1)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="kv_transfer.control"):
            sock = _raw(address)
            sock.sendall(opening)  # ... and a captured copy is refused
            assert _closed_by_server(sock)
            assert _until(lambda: any("refused" in r.getMessage() for r in caplog.records))
        refusals = [r for r in caplog.records if "refused" in r.getMessage()]
        assert len(refusals) == 1 and refusals[0].levelno == logging.WARNING
        assert "\n" not in refusals[0].getMessage() and refusals[0].exc_info is None
        assert len(inbox.opened) == (1 if how == "replay" else 0)
        assert inbox.landed == []
        if how == "replay":
            first.close()


def test_connections_over_the_cap_are_closed() -> None:
    with _server(max_connections=2) as (server, inbox, address):
        auth = HelloAuth(SECRET)
        clients = [ControlClient(address, _hello(rank), WAIT_S, auth) for rank in (0, 1)]
        assert _until(lambda: len(inbox.opened) == 2)
        extra = _raw(address)  # refused before anything is read
        assert _closed_by_server(extra)
        assert server.num_connections == 2
        clients[0].close()
        assert _until(lambda: server.num_connections == 1)
        again = ControlClient(address, _hello(0), WAIT_S, auth)  # room again
        assert _until(lambda: len(inbox.opened) == 3)
        for client in (*clients, again):
            client.close()


def test_idle_connection_is_closed_and_its_peer_lost() -> None:
    with _server(idle_timeout_s=0.3) as (server, inbox, address):
        client = ControlClient(address, _hello(), WAIT_S, HelloAuth(SECRET), max_idle_s=0.15)
        assert not client.stale
        assert _until(lambda: inbox.lost != [], limit=3.0)
        assert "idle" in inbox.lost[0]
        assert client.stale  # the sender would have dropped the link before this
        assert _until(lambda: server.num_connections == 0)
        client.close()


def test_a_cut_message_does_not_hold_the_reader() -> None:
    """Half a header after the HELLO, then nothing: the idle timeout ends the read."""
    with _server(idle_timeout_s=0.3) as (_srv, inbox, address):
        sock = _raw(address)
        hello = _hello().pack()
        sock.sendall(hello + HelloAuth(SECRET).seal(address, hello))
        sock.sendall(Header(MessageKind.END, "t", 0).pack()[:10])
        assert _until(lambda: inbox.lost != [], limit=3.0)
        assert _closed_by_server(sock)


def test_tcp_sockets_have_keepalive() -> None:
    with _server() as (_srv, _inbox, address):
        client = ControlClient(address, _hello(), WAIT_S, HelloAuth(SECRET))
        sock = client._sock
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
        client.close()
    a, b = socket.socketpair()
    tune_socket(a)  # a Unix socket: nothing to tune, and no error
    a.close()
    b.close()


def test_unix_control_socket_checks_peer_credentials() -> None:
    a, b = socket.socketpair()
    assert peer_credentials(a) == (os.getpid(), os.getuid(), os.getgid())
    same_user()(a)
    with pytest.raises(AuthError, match=f"uid {os.getuid()}, not {os.getuid() + 1}"):
        same_user(os.getuid() + 1)(a)
    a.close()
    b.close()
    name = f"unix:@pdkv-test-{os.urandom(6).hex()}"
    with _server(name, check_peer=same_user(os.getuid() + 1)) as (_srv, inbox, address):
        clients: list[ControlClient] = []
        # the server closes it at accept: the HELLO or a later header meets a closed pipe
        with pytest.raises(TransferError):
            clients.append(ControlClient(address, _hello(), WAIT_S, HelloAuth(SECRET)))
            for _ in range(50):
                clients[0].send(Header(MessageKind.END, "t", 0).pack())
                time.sleep(0.01)
        assert inbox.opened == []
        for client in clients:
            client.close()
    with _server(name, check_peer=same_user()) as (_srv, inbox, address):
        client = ControlClient(address, _hello(), WAIT_S, HelloAuth(SECRET))
        assert _until(lambda: len(inbox.opened) == 1)
        client.close()


# -- staging bound ----------------------------------------------------------------------


def test_staging_in_use_is_bounded() -> None:
    pool = StagingPool(max_in_use=256, wait_s=0.2)
    cpu = torch.device("cpu")
    first = pool.take((32,), torch.float32, cpu)  # 128 bytes
    second = pool.take((32,), torch.float32, cpu)
    assert pool.in_use_bytes == 256
    with pytest.raises(TransferError, match="no staging room"):
        pool.take((1,), torch.float32, cpu)
    with pytest.raises(ProtocolError, match="exceeds the staging bound"):
        pool.take((65,), torch.float32, cpu)
    threading.Timer(0.05, pool.give, args=(first,)).start()
    third = pool.take((16,), torch.float64, cpu)  # waits for the give
    pool.forget(second)
    pool.give(third)
    assert pool.in_use_bytes == 0
