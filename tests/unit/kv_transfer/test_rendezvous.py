"""Rendezvous records: TTL, leases, ownership, and strict parsing."""

from __future__ import annotations

import time

import pytest

from kv_transfer.base import RankId, TransferError
from kv_transfer.rendezvous import (
    Lease,
    MemoryRendezvous,
    decode_record,
    encode_record,
    rank_key,
    resolve,
    split_hostport,
)


def test_records_expire_without_refresh() -> None:
    store = MemoryRendezvous()
    store.publish("k", "v", ttl_s=0.05)
    assert store.lookup("k") == "v"
    time.sleep(0.08)
    assert store.lookup("k") is None


def test_a_lease_outlives_its_ttl_and_withdraws_on_close() -> None:
    store = MemoryRendezvous()
    lease = Lease(store, "k", "v", ttl_s=0.15)
    time.sleep(0.4)
    assert store.lookup("k") == "v"
    lease.close()
    assert store.lookup("k") is None
    lease.close()  # idempotent


def test_withdraw_leaves_a_newer_owner_alone() -> None:
    store = MemoryRendezvous()
    store.publish("k", "old", 10)
    store.publish("k", "new", 10)  # a restarted rank took the key over
    store.withdraw("k", "old")
    assert store.lookup("k") == "new"


def test_records_are_parsed_strictly() -> None:
    schema = {"control": str, "port": int}
    assert decode_record(encode_record(control="x", port=1), schema) == {"control": "x", "port": 1}
    for raw in (
        '{"control": "x"}',
        '{"control": "x", "port": "1"}',
        "[1]",
        "not json",
        '{"control": "x", "port": 1, "extra": 0}',
    ):
        with pytest.raises(TransferError):
            decode_record(raw, schema)


def test_resolve_names_the_missing_rank() -> None:
    with pytest.raises(TransferError, match="decode-3/1"):
        resolve(MemoryRendezvous(), "shm", RankId("decode-3", 1), {})
    assert rank_key("shm", RankId("decode-3", 1)) == "shm:decode-3:1"


@pytest.mark.parametrize("text", ["127.0.0.1", "h:0", "h:70000", ":80", "h:x"])
def test_bad_addresses_are_refused(text: str) -> None:
    with pytest.raises(TransferError):
        split_hostport(text)
    assert split_hostport("::1:80") == ("::1", 80)
