"""Admission on a control server: who may connect, how many at once, for how long.

A `ServerGuard` is a control server's policy: the HELLO seal checker (auth.py) and the
address seals are bound to, an optional check of the peer's socket before anything is
read (the shm transport's SO_PEERCRED check: `same_user`), a cap on open connections
(each holds up to three threads and a window of staging buffers) and an idle timeout
after the HELLO. Refusals are logged as one warning line each, throttled (`Throttle`)
so a flood of connections cannot flood the log.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from kv_transfer.auth import AuthError, HelloAuth

logger = logging.getLogger("kv_transfer.control")

CheckPeer = Callable[[socket.socket], None]  # raises AuthError to refuse a connection

DEFAULT_MAX_CONNECTIONS = 256
DEFAULT_IDLE_TIMEOUT_S = 300.0
# TCP keepalive: first probe after 60 s idle, then every 10 s, dead after 5 misses.
_KEEPALIVE = (("TCP_KEEPIDLE", 60), ("TCP_KEEPINTVL", 10), ("TCP_KEEPCNT", 5))


def tune_socket(sock: socket.socket) -> None:
    """No Nagle delay, and keepalive probes on an idle TCP connection."""
    if sock.family == socket.AF_UNIX:
        return
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in _KEEPALIVE:
        option = getattr(socket, name, None)
        if option is not None:
            sock.setsockopt(socket.IPPROTO_TCP, option, value)


def describe_peer(sock: socket.socket) -> str:
    """Who is at the other end, for logs: host:port, or a local process's pid and uid."""
    try:
        if sock.family == socket.AF_UNIX:
            pid, uid, _ = peer_credentials(sock)
            return f"pid {pid} uid {uid}"
        host, port = sock.getpeername()[:2]
        return f"{host}:{port}"
    except OSError:
        return "?"


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket, as the kernel
    recorded them when it connected (SO_PEERCRED: not something the peer asserts)."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


class Throttle:
    """At most one warning a second per kind; the ones held back are counted into the
    next, so a flood of refused connections cannot flood the log."""

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval = interval_s
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}
        self._held: dict[str, int] = {}

    def warn(self, kind: str, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last.get(kind, -self._interval) < self._interval:
                self._held[kind] = self._held.get(kind, 0) + 1
                return
            self._last[kind] = now
            held = self._held.pop(kind, 0)
        if held:
            logger.warning(msg + " (and %d more like it)", *args, held)
        else:
            logger.warning(msg, *args)


@dataclass(frozen=True)
class ServerGuard:
    """Who a control server lets in, and for how long.

    `auth` checks each HELLO's seal (None: HELLOs are not sealed). `address` is the
    server's published address, which seals are bound to. `check_peer` may refuse a
    connection by its socket before anything is read. At most `max_connections` are
    open at once, counting those still in their handshake. A connection that sends
    nothing for `idle_timeout_s` after its HELLO is closed.
    """

    auth: HelloAuth | None = None
    address: str = ""
    check_peer: CheckPeer | None = None
    max_connections: int = DEFAULT_MAX_CONNECTIONS
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.max_connections < 1 or self.idle_timeout_s <= 0:
            raise ValueError(f"invalid ServerGuard {self}")
        if self.auth is not None and not self.address:
            raise ValueError("an authenticating server needs its published address")


def same_user(uid: int | None = None) -> CheckPeer:
    """A `check_peer` that admits only processes of user `uid` (default: this
    process's user) on a Unix socket, by the credentials the kernel recorded."""
    allowed = os.getuid() if uid is None else uid

    def check(sock: socket.socket) -> None:
        pid, peer_uid, _ = peer_credentials(sock)
        if peer_uid != allowed:
            raise AuthError(f"peer pid {pid} runs as uid {peer_uid}, not {allowed}")

    return check


def server_guard(
    secret: bytes | None,
    address: str,
    *,
    max_connections: int,
    idle_timeout_s: float,
    check_peer: CheckPeer | None = None,
) -> ServerGuard:
    """A receiver's control-server policy from its transport's config; without a
    secret it warns that HELLOs are not authenticated."""
    if secret is None:
        logger.warning("KV control channel %s accepts HELLOs without a seal (no secret)", address)
    return ServerGuard(
        auth=HelloAuth(secret) if secret is not None else None,
        address=address,
        check_peer=check_peer,
        max_connections=max_connections,
        idle_timeout_s=idle_timeout_s,
    )
