"""KVSender.finish over a link that reads the source blocks until its sends complete
(zero-copy): with `wait` it returns only once they did; without, at once, and the
transfer still ends DONE, or FAILED on abort. `reading` says when the blocks are free to
go: never while a send still reads them, even after the transfer failed."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import torch

from engine.kv_cache import KVCache
from kv_transfer.base import InstanceRef, LocalRank, RankId, SendSpec, TransferState
from kv_transfer.header import Header
from kv_transfer.mapping import KVGeometry
from kv_transfer.regions import BlockRegion, LayerSpan
from kv_transfer.sender import KVSender
from kv_transfer.testing import rank_layout
from kv_transfer.transport import Completion, Connector, Link

GEO = KVGeometry(2, 2)
ME = LocalRank("prefill-0")
DEST = InstanceRef("decode")
WAIT_S = 5.0


class HeldLink(Link):
    """DATA sends stay pending, reading their source, until the test resolves them."""

    max_layers = 1

    def __init__(self, peer: RankId) -> None:
        self.peer = peer
        self.pending: list[Completion] = []
        self.closed = False

    @property
    def broken(self) -> bool:
        return self.closed

    def send(
        self, header: Header, region: BlockRegion | LayerSpan | None, checksum: bool = False
    ) -> Completion:
        if region is None:
            return Completion.resolved()
        done = Completion(holds_source=True)
        self.pending.append(done)
        return done

    def resolve_all(self) -> None:
        pending, self.pending = self.pending, []
        for done in pending:
            done.resolve()

    def close(self) -> None:
        self.closed = True
        for done in self.pending:
            done.resolve("link closed")


class HeldConnector(Connector):
    def __init__(self) -> None:
        self.links: list[HeldLink] = []

    def connect(self, me: LocalRank, peer: RankId) -> Link:
        link = HeldLink(peer)
        self.links.append(link)
        return link


@pytest.fixture
def held() -> Iterator[tuple[KVSender, HeldConnector]]:
    cache = KVCache(rank_layout(GEO, ME, 8, 4, 8, torch.float32))
    connector = HeldConnector()
    sender = KVSender(ME, cache, GEO, connector)
    yield sender, connector
    sender.close()


def _send_all(sender: KVSender, connector: HeldConnector, tid: str) -> HeldLink:
    sender.open(SendSpec(tid, DEST, 0, 10.0))
    for layer in range(GEO.num_layers):
        sender.send_layer(tid, layer, [1, 2], 0)
    deadline = time.monotonic() + WAIT_S
    while not (connector.links and len(connector.links[0].pending) == GEO.num_layers):
        assert time.monotonic() < deadline, "the pump never sent the layers"
        time.sleep(0.001)
    return connector.links[0]


def _wait_terminal(sender: KVSender, tid: str) -> TransferState:
    deadline = time.monotonic() + WAIT_S
    while not sender.poll(tid).terminal:
        assert time.monotonic() < deadline
        time.sleep(0.001)
    return sender.poll(tid).state


def test_finish_waits_for_sends_that_read_the_source(
    held: tuple[KVSender, HeldConnector],
) -> None:
    sender, connector = held
    link = _send_all(sender, connector, "t")
    finisher = threading.Thread(target=sender.finish, args=("t",))
    finisher.start()
    finisher.join(0.2)
    assert finisher.is_alive()  # the sends still read the blocks
    link.resolve_all()
    finisher.join(WAIT_S)
    assert not finisher.is_alive()
    assert _wait_terminal(sender, "t") is TransferState.DONE


def _wait_unread(sender: KVSender, tid: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while sender.reading(tid):
        assert time.monotonic() < deadline, f"{tid} is still read"
        time.sleep(0.001)


def test_finish_without_wait_returns_while_the_sends_read(
    held: tuple[KVSender, HeldConnector],
) -> None:
    sender, connector = held
    link = _send_all(sender, connector, "t1")
    assert sender.reading("t1")
    sender.finish("t1", wait=False)
    assert sender.poll("t1").state is TransferState.TRANSFERRING
    link.resolve_all()
    assert _wait_terminal(sender, "t1") is TransferState.DONE
    _wait_unread(sender, "t1")  # once the pump is past its END
    # Aborted after finish, while its sends are pending: FAILED, but its blocks are
    # read until those sends are over; then nothing is left.
    link = _send_all(sender, connector, "t2")
    sender.finish("t2", wait=False)
    sender.abort("t2", "caller went away")
    assert sender.poll("t2").state is TransferState.FAILED
    time.sleep(0.05)
    assert sender.reading("t2")
    link.resolve_all()
    _wait_unread(sender, "t2")
    assert sender.num_active == sender.num_reading == 0


def test_a_transfer_that_never_sent_is_unread_once_it_ends(
    held: tuple[KVSender, HeldConnector],
) -> None:
    sender, _ = held
    sender.open(SendSpec("t", DEST, 0, 10.0))
    assert sender.reading("t")  # blocks may be queued until it is over
    sender.abort("t", "nothing to send")
    _wait_unread(sender, "t")
    assert not sender.reading("never-opened")
