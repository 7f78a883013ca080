"""A switchable replica's other ranks hold both pools' rank roles over one KV cache
(`dual_worker.rank_role.DualRankRole`): each remote call reaches the half it names, and
the generic calls answer for the side rank 0 asks them of."""

from __future__ import annotations

import inspect
from collections.abc import Iterator

import pytest
import torch

from decode_worker.rank_role import DecodeRankRole
from dual_worker.rank_role import DualRankRole
from engine.config import EngineConfig
from engine.kv_cache import KVCache
from kv_transfer.base import (
    InstanceRef,
    LocalRank,
    Parallelism,
    RecvSpec,
    SendSpec,
    TransferRecord,
    TransferState,
)
from kv_transfer.mapping import KVGeometry
from kv_transfer.rendezvous import MemoryRendezvous
from kv_transfer.testing import rank_layout
from kv_transfer.transport import TransportKind
from prefill_worker.rank_role import PrefillRankRole
from registry import Role
from worker.messages import WorkerSettings
from worker.rank_role import RankContext, RankRole
from worker.ranks import _GENERIC

GEO = KVGeometry(num_layers=2, num_kv_heads=2)
TP2 = Parallelism(2, 1)
HEAD_DIM, BLOCK, NUM_BLOCKS = 8, 4, 16


def _remote_calls(cls: type[RankRole]) -> set[str]:
    return {
        name
        for name, _ in inspect.getmembers(cls, inspect.isfunction)
        if not name.startswith("_") and name not in _GENERIC
    }


def _settings() -> WorkerSettings:
    return WorkerSettings(
        cluster="c",
        pool="prefill",
        role=Role.PREFILL,
        engine=EngineConfig(block_size=BLOCK, tp=2),
        redis_url="redis://127.0.0.1:1",
        lease_ttl_s=5.0,
        load_report_interval_s=1.0,
        transport=TransportKind.TORCH_DIST,
        transfer_host="127.0.0.1",
        transfer_timeout_s=5.0,
        switchable=True,
    )


@pytest.fixture
def role() -> Iterator[DualRankRole]:
    settings = _settings()
    me = LocalRank("switch-0", TP2, 1, 0)
    records: list[TransferRecord] = []
    kv = KVCache(rank_layout(GEO, me, HEAD_DIM, BLOCK, NUM_BLOCKS, torch.float32))
    ctx = RankContext(settings, me, kv, GEO, MemoryRendezvous(), "127.0.0.1", 0, records.append)
    r = DualRankRole(settings)
    r.start(ctx)
    yield r
    r.close()


def test_every_remote_call_of_either_half_reaches_the_composite() -> None:
    sends, recvs = _remote_calls(PrefillRankRole), _remote_calls(DecodeRankRole)
    assert sends and recvs
    assert not sends & recvs  # a name picks its half
    assert sends | recvs <= _remote_calls(DualRankRole)


def test_a_receive_ends_through_the_decode_half(role: DualRankRole) -> None:
    src = InstanceRef("prefill-0", TP2)
    role.expect(RecvSpec("t-in", (1, 2), src, 0, 5.0))
    assert role.num_active() == 1
    role.abort_recv("t-in", "client went away")
    ended = role.take_ended(timeout_s=5.0)
    assert ended["t-in"].state is TransferState.FAILED
    assert role.num_active() == 0


def test_a_send_is_polled_on_the_prefill_half(role: DualRankRole) -> None:
    dest = InstanceRef("decode-0", TP2)
    role.add_transfer("r-out", SendSpec("t-out", dest, 0, 5.0, None))
    assert role.step_hook() is not None
    role.abort_send("r-out", "t-out", "prefill abandoned")
    (status,) = role.poll(["t-out"])
    assert status.state is TransferState.FAILED
    assert not role.reading("t-out")
    assert role.take_ended(timeout_s=0.0) == {}  # the send side reports nothing there
