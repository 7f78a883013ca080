"""A TCPStore server that listens only on the address it is given.

torch's TCPStore server (both its libuv and its classic backend, torch 2.13) binds
every interface, whatever host it is handed: the host only names where clients
connect. `serve_tcp_store(host)` binds the listening socket itself, on exactly `host`
and a free port, and hands its descriptor to the store (`master_listen_fd`), which
then owns and closes it. Binding wider is then an explicit setting (host "0.0.0.0").
"""

from __future__ import annotations

import socket
from datetime import timedelta

from torch._C._distributed_c10d import TCPStore

_BACKLOG = 128


def listening_socket(host: str) -> socket.socket:
    """A TCP socket listening on `host` (an address or a name) and a free port."""
    family, kind, proto, _, addr = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(addr)
        sock.listen(_BACKLOG)
    except OSError:
        sock.close()
        raise
    return sock


def serve_tcp_store(host: str, timeout_s: float) -> TCPStore:
    """A TCPStore server on `host` only, on a free port (its `port`)."""
    sock = listening_socket(host)
    port = sock.getsockname()[1]
    fd = sock.detach()  # the store owns the descriptor from here on
    try:
        return TCPStore(
            host,
            port,
            None,
            True,
            timeout=timedelta(seconds=timeout_s),
            wait_for_workers=False,
            master_listen_fd=fd,
        )
    except BaseException:
        socket.close(fd)
        raise
