"""TCPStore servers listen only where configured: a receiver's pair store and control
listener, and a TP/PP driver's store, bound to loopback, refuse a connection made to
this machine's non-loopback address (torch's own server would accept it: it listens
on every interface whatever host it is given)."""

from __future__ import annotations

import ipaddress
import json
import socket
import subprocess
from datetime import timedelta

import pytest
import torch
from torch._C._distributed_c10d import TCPStore

from engine.kv_cache import KVCache
from engine.parallel.comm import connect_store, serve_store
from engine.parallel.tcp_store import serve_tcp_store
from kv_transfer.base import LocalRank
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver
from kv_transfer.rendezvous import MemoryRendezvous
from kv_transfer.testing import rank_layout
from kv_transfer.torch_dist import TorchDistConfig, TorchDistEndpoint


def _other_address() -> str | None:
    """A non-loopback IPv4 address of this machine (`hostname -I`), if it has one."""
    try:
        out = subprocess.run(
            ["hostname", "-I"], capture_output=True, text=True, timeout=5, check=True
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    for word in out.split():
        addr = ipaddress.ip_address(word)
        if addr.version == 4 and not addr.is_loopback:
            return word
    return None


OTHER = _other_address()
needs_other = pytest.mark.skipif(
    OTHER is None, reason="this machine has no non-loopback IPv4 address to connect from"
)


def _refused(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=2.0):
            return False
    except ConnectionRefusedError:
        return True


def _reachable(host: str, port: int) -> bool:
    with socket.create_connection((host, port), timeout=2.0):
        return True


@needs_other
def test_torch_alone_would_listen_everywhere() -> None:
    """Why the wrapper exists: the unwrapped server accepts on OTHER."""
    assert OTHER is not None
    store = TCPStore(
        "127.0.0.1", 0, None, True, timeout=timedelta(seconds=5), wait_for_workers=False
    )
    assert _reachable(OTHER, store.port)


@needs_other
def test_store_on_loopback_refuses_other_addresses() -> None:
    assert OTHER is not None
    store = serve_tcp_store("127.0.0.1", 5.0)
    assert _refused(OTHER, store.port)
    client = TCPStore("127.0.0.1", store.port, None, False, timeout=timedelta(seconds=5))
    client.set("k", b"v")
    assert store.get("k") == b"v"
    driver, addr = serve_store(5.0, host="127.0.0.1")
    assert _refused(OTHER, addr.port)
    connect_store(addr, 5.0).set("rank", b"1")
    assert driver.get("rank") == b"1"


@needs_other
def test_receiver_listens_on_its_configured_host_only() -> None:
    assert OTHER is not None
    geo, me, store = KVGeometry(2, 2), LocalRank("decode-0"), MemoryRendezvous()
    cache = KVCache(rank_layout(geo, me, 8, 4, 8, torch.float32))
    receiver = KVReceiver(me, cache, geo, TorchDistEndpoint(store, TorchDistConfig()))
    try:
        raw = store.lookup("torch_dist:decode-0:0")
        assert raw is not None
        record = json.loads(raw)
        store_port = int(record["store"].rsplit(":", 1)[1])
        control_port = int(record["control"].rsplit(":", 1)[1])
        for port in (store_port, control_port):
            assert _refused(OTHER, port)
            assert _reachable("127.0.0.1", port)
    finally:
        receiver.close()
