"""The control server's receive pipeline, over a real socket, with a scripted session.

The session stands in for a transport's data path: each posted receive finishes when
the test says so, or fails. The inbox records what the server calls, in order. This
pins down the order of events that the multi-process tests only reach by chance.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest
import torch

from kv_transfer.base import TransferError
from kv_transfer.control import ControlClient, ControlServer, Finish, listen
from kv_transfer.header import Header, Hello, MessageKind
from kv_transfer.regions import BlockRegion
from kv_transfer.transport import Peer, Target

WAIT_S = 5.0
# The control server hands targets through without reading them; the session here
# receives nothing into them.
_REGION = BlockRegion(torch.zeros(1, 2, 1, 1, 1, 8), 0, 0, 1, (0,))


def _until(cond: Callable[[], bool], limit: float = WAIT_S) -> bool:
    deadline = time.monotonic() + limit
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


@dataclass
class _Receive:
    """One posted receive: it finishes once `release` is set, or fails with `error`."""

    header: Header
    release: threading.Event = field(default_factory=threading.Event)
    error: str | None = None


class ScriptedSession:
    direct_ok = True

    def __init__(self) -> None:
        self.posted: list[_Receive] = []
        self.closed = False

    def start(self, header: Header, target: Target | None) -> Finish:
        receive = _Receive(header)
        self.posted.append(receive)

        def finish() -> torch.Tensor | None:
            if not receive.release.wait(WAIT_S):
                raise TransferError("test never released the receive")
            if receive.error is not None:
                raise TransferError(receive.error)
            return None

        return finish

    def done(self, payload: torch.Tensor) -> None:
        pass

    def close(self) -> None:
        self.closed = True


class RecordingInbox:
    """Direct targets for every DATA message; `land` of a message can be made to wait
    until the receives after it stopped writing (as ending a transfer does)."""

    max_payload_bytes = 1 << 20
    max_payload_layers = 4

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.events: list[tuple[str, int]] = []
        self.writing = 0
        self.lost: str | None = None
        self.drain_on_land: set[int] = set()

    def _log(self, what: str, seq: int) -> None:
        with self.lock:
            self.events.append((what, seq))

    def prepare(self, peer: Peer, header: Header, direct_ok: bool) -> Target | None:
        with self.lock:
            self.writing += 1
        return Target(_REGION, direct=True)

    def written(self, target: Target) -> None:
        with self.lock:
            self.writing -= 1

    def land(
        self, peer: Peer, header: Header, target: Target | None, payload: torch.Tensor | None
    ) -> None:
        if header.seq in self.drain_on_land:
            assert _until(lambda: self.writing == 0), "land waited on writes that never ended"
        self._log("land", header.seq)

    def on_peer_lost(self, peer: Peer, reason: str) -> None:
        self.lost = reason

    def landed(self) -> list[int]:
        with self.lock:
            return [seq for what, seq in self.events if what == "land"]


@dataclass
class Server:
    server: ControlServer
    session: ScriptedSession
    inbox: RecordingInbox
    client: ControlClient
    seq: int = 0

    def data(self) -> None:
        self._send(MessageKind.DATA)

    def end(self) -> None:
        self._send(MessageKind.END)

    def _send(self, kind: MessageKind) -> None:
        self.client.send(Header(kind, "t", 0, seq=self.seq).pack())
        self.seq += 1


@pytest.fixture
def served() -> Iterator[Server]:
    session, inbox = ScriptedSession(), RecordingInbox()
    listener, address = listen("tcp://127.0.0.1:0")
    server = ControlServer(
        listener, inbox, lambda peer: session, WAIT_S, "test", pipelined=True, window=2
    )
    client = ControlClient(address, Hello("prefill-0", 0, 1, 1, os.urandom(16)), WAIT_S)
    yield Server(server, session, inbox, client)
    for receive in session.posted:
        receive.release.set()
    client.close()
    server.close(timeout_s=WAIT_S)
    assert server.num_connections == 0
    assert session.closed
    assert inbox.writing == 0  # every direct receive reported that it stopped writing


def test_receives_are_posted_as_headers_arrive_up_to_the_window(served: Server) -> None:
    served.data()
    assert _until(lambda: len(served.session.posted) == 1)
    time.sleep(0.05)  # the reader has nothing more to read while the first receive runs
    served.data()
    served.data()
    # The second is posted before the first finished; the third waits for a slot.
    assert _until(lambda: len(served.session.posted) == 2)
    time.sleep(0.05)
    assert len(served.session.posted) == 2 and served.inbox.landed() == []
    served.session.posted[0].release.set()
    assert _until(lambda: len(served.session.posted) == 3)
    assert _until(lambda: served.inbox.landed() == [0])
    served.end()
    for receive in served.session.posted[1:]:
        receive.release.set()
    assert _until(lambda: served.inbox.landed() == [0, 1, 2, 3])  # in order, END last


def test_landing_may_wait_for_later_receives_to_stop_writing(served: Server) -> None:
    """Ending a transfer in `land` waits until no receive writes into its blocks; the
    later receives are finished by another thread, so that wait ends."""
    served.inbox.drain_on_land = {0}
    served.data()
    served.data()
    assert _until(lambda: len(served.session.posted) == 2)
    served.session.posted[0].release.set()
    time.sleep(0.05)
    served.session.posted[1].release.set()
    assert _until(lambda: served.inbox.landed() == [0, 1])


def test_a_failed_receive_ends_the_connection_and_nothing_after_it_lands(
    served: Server,
) -> None:
    served.data()
    served.data()
    assert _until(lambda: len(served.session.posted) == 2)
    first, second = served.session.posted
    first.error = "peer vanished mid-payload"
    first.release.set()
    second.release.set()
    assert _until(lambda: served.inbox.lost is not None)
    assert served.inbox.lost == "peer vanished mid-payload"
    assert served.inbox.landed() == []
    assert _until(lambda: served.server.num_connections == 0)
