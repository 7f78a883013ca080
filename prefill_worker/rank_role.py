"""A prefill rank's kv_transfer side: its connector, and on ranks 1..N-1 its role.

Every rank of a prefill replica sends its own KV slices (kv_transfer's M:N plan) over
a `Connector` (torch_dist or shm, wrapped in the fault injector when the config asks
for a drill). On ranks 1..N-1, `PrefillRankRole` holds the rank's `KVSender` and a
`SendHook` on its step thread:

    add_transfer     rank 0 registers the request on every rank's hook before its own
                     engine sees the prompt
    steps            the hook queues each layer's newly complete blocks to the sender
    poll             the transfer is sent once every rank reports DONE
    reading          rank 0's block pins cover every rank's sources, until no rank's
                     sender reads them; so these hooks pin nothing
    abort_send       drop the request from the hook and fail its transfer
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence

from engine.forward_hooks import LayerHook, ScheduledChunk
from engine.parallel.worker import TagResolver
from engine.step_inputs import request_tag
from kv_transfer.base import SendSpec, TransferStatus
from kv_transfer.engine_hook import SendHook
from kv_transfer.faults import FaultyConnector
from kv_transfer.rendezvous import RendezvousStore
from kv_transfer.sender import KVSender
from kv_transfer.shm import ShmConfig, ShmConnector
from kv_transfer.torch_dist import TorchDistConfig, TorchDistConnector
from kv_transfer.transport import Connector, TransportKind
from telemetry import request_scope
from worker.kv_rank import transfer_secret
from worker.messages import WorkerSettings
from worker.rank_role import RankContext, RankRole

logger = logging.getLogger(__name__)


def sender_connector(settings: WorkerSettings, store: RendezvousStore, host: str) -> Connector:
    secret = transfer_secret(settings)
    connector: Connector = (
        ShmConnector(store, ShmConfig(secret=secret))
        if settings.transport is TransportKind.SHM
        else TorchDistConnector(store, TorchDistConfig(host=host, secret=secret))
    )
    if settings.faults:
        logger.warning("%s injects KV-transfer faults %s", settings.pool, settings.faults)
        connector = FaultyConnector(connector, settings.faults)
    return connector


class _HeldByRankZero:
    """The source pins of ranks 1..N-1. Rank 0's engine hands out every rank's block
    ids, and its own pins keep a transfer's ids from being handed out again until no
    rank's sender reads them (`reading`); so `finish` need not wait here either, and
    there is nothing to hold."""

    def pin(self, key: str, block_ids: Sequence[int]) -> None:
        del key, block_ids


class _LockedHook:
    """A SendHook that Ray's method thread (add, discard) and the rank's step thread
    (the layer callbacks) share, with the request tags the step carries."""

    def __init__(self, hook: SendHook) -> None:
        self._hook = hook
        self._lock = threading.Lock()
        self._tags: dict[int, str] = {}

    def add(self, request_id: str, spec: SendSpec) -> None:
        with self._lock:
            self._hook.add(request_id, spec)
            self._tags[request_tag(request_id)] = request_id

    def discard(self, request_id: str, reason: str) -> None:
        with self._lock:
            self._hook.discard(request_id, reason)
            self._tags.pop(request_tag(request_id), None)

    def resolve(self, tag: int) -> str | None:
        with self._lock:
            return self._tags.get(tag)

    def on_layer_done(self, layer: int, chunks: Sequence[ScheduledChunk]) -> None:
        with self._lock:
            self._hook.on_layer_done(layer, chunks)

    def on_step_done(self, chunks: Sequence[ScheduledChunk]) -> None:
        with self._lock:
            self._hook.on_step_done(chunks)
            for c in chunks:
                if c.completes_prompt:
                    self._tags.pop(request_tag(c.request_id), None)


class PrefillRankRole(RankRole):
    """Rank `>= 1` of a prefill replica: a sender fed by the rank's step thread."""

    def __init__(self, settings: WorkerSettings) -> None:
        self._block_size = settings.engine.block_size
        self._sender: KVSender | None = None
        self._hook: _LockedHook | None = None

    def start(self, ctx: RankContext) -> None:
        connector = sender_connector(ctx.settings, ctx.rendezvous, ctx.host)
        self._sender = KVSender(
            ctx.me, ctx.kv, ctx.geometry, connector, registry=ctx.rendezvous, on_record=ctx.record
        )
        hook = SendHook(self._block_size, self._sender, ctx.layer_offset, pins=_HeldByRankZero())
        self._hook = _LockedHook(hook)

    def step_hook(self) -> tuple[LayerHook, TagResolver] | None:
        return None if self._hook is None else (self._hook, self._hook.resolve)

    def _started(self) -> tuple[KVSender, _LockedHook]:
        if self._sender is None or self._hook is None:
            raise RuntimeError("the prefill rank role is not started")
        return self._sender, self._hook

    def add_transfer(self, request_id: str, spec: SendSpec) -> None:
        with request_scope(request_id):  # the sender keeps it for its log lines
            self._started()[1].add(request_id, spec)

    def abort_send(self, request_id: str, transfer_id: str, reason: str) -> None:
        sender, hook = self._started()
        hook.discard(request_id, reason)
        sender.abort(transfer_id, reason)

    def reading(self, transfer_id: str) -> bool:
        """Whether this rank's sender may still read the transfer's source blocks."""
        return self._started()[0].reading(transfer_id)

    def poll(self, transfer_ids: list[str]) -> list[TransferStatus]:
        sender = self._started()[0]
        return [sender.poll(t) for t in transfer_ids]

    def num_active(self) -> int:
        return self._sender.num_active if self._sender is not None else 0

    def close(self) -> None:
        if self._sender is not None:
            self._sender.close()
