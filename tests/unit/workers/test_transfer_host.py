"""kv_transfer.host "auto": each replica binds and advertises its own node's IP."""

from __future__ import annotations

import ipaddress

from ray.util import get_node_ip_address

from worker.runtime import transfer_host


def test_a_configured_host_is_used_as_is() -> None:
    assert transfer_host("10.1.2.3") == "10.1.2.3"
    assert transfer_host("127.0.0.1") == "127.0.0.1"


def test_auto_is_the_node_ip_ray_reports() -> None:
    host = transfer_host("auto")
    ipaddress.ip_address(host)  # an address, not the word "auto"
    assert host == get_node_ip_address()
