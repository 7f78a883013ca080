"""The KV-cache data plane from the prefill pool to the decode pool.

Each rank holds one role object: a `KVSender` on a prefill rank, a `KVReceiver` on a
decode rank. The decode side preallocates blocks and registers the transfer
(`expect`); the prefill side streams each layer's blocks as its forward pass writes
them (`send_layer`, fed by `SendHook` on the engine) and then `finish`es. Both sides
`poll` without blocking (PENDING / TRANSFERRING / DONE / FAILED(reason)) and `abort`.

    base.py        states, specs, rank identities, the role interfaces
    mapping.py     the M:N plan between two TP/PP layouts (replicated KV heads included)
    header.py      the fixed-layout message header (struct, never pickle)
    regions.py     block regions of the paged cache: copies and checksums
    region_copies.py  copies that checksum in the same pass
    block_runs.py  runs of consecutive block ids
    sender.py      the sender role, over any transport
    send_pump.py   the sender's thread: jobs into messages on links
    outbound.py    the sender's records and the pump's jobs
    receiver.py    the receiver role, over any transport
    transport.py   what a transport plugs in: Connector/Link, Endpoint/Inbox
    control.py     per-pair control sockets carrying the headers
    auth.py        the HELLO's seal: HMAC-SHA256 with the cluster secret, no replay
    guard.py       who a control server admits: seal, peer check, caps, idle timeout
    lander.py      a control connection's receive pipeline (posted receives land)
    torch_dist.py  point-to-point send/recv over per-pair Gloo/NCCL groups
    torch_dist_{pair,link,session}.py  the pair's group, its sender and receiver ends
    shm.py         same-host: senders write straight into the decode cache
    shm_segment.py the shared-memory cache file and its slot table
    fake.py        in-process transport for unit tests
    faults.py      drop / delay / corrupt / kill, around any transport
    rendezvous.py  receiver addresses in Redis (or memory) with TTL leases
    engine_hook.py the prefill engine's LayerHook
    staging.py     reusable staging buffers, bounded on a receiver
    testing.py     reference KV and per-rank caches for tests and benchmarks

It depends on torch, on the engine's cache layout and hook types, and on a rendezvous
store interface only.
"""

from kv_transfer.base import (
    InstanceRef,
    LocalRank,
    Parallelism,
    RankId,
    RecvSpec,
    SendSpec,
    TransferReceiver,
    TransferSender,
    TransferState,
    TransferStatus,
)
from kv_transfer.engine_hook import SendHook
from kv_transfer.mapping import KVGeometry
from kv_transfer.receiver import KVReceiver, ReceiverConfig
from kv_transfer.sender import KVSender, SenderConfig

__all__ = [
    "InstanceRef",
    "KVGeometry",
    "KVReceiver",
    "KVSender",
    "LocalRank",
    "Parallelism",
    "RankId",
    "ReceiverConfig",
    "RecvSpec",
    "SendHook",
    "SendSpec",
    "SenderConfig",
    "TransferReceiver",
    "TransferSender",
    "TransferState",
    "TransferStatus",
]
