"""Pins: references that keep a finished request's blocks allocated for a while.

A prefill engine frees a request's blocks the moment its prompt is done, but a
transfer may still be reading them (sends straight from the cache). The transfer's
owner pins the blocks before the engine frees them and releases the pin once the
transfer is over. Until then the pool cannot hand the blocks out again; full ones stay
findable as prefix cache and shareable as usual.

Engine thread only, like the pool:

    pin(key, block_ids)    one more reference on each block, added to the key's pins
    release(key)           drop the key's references, tail first; a key not pinned is a
                           no-op
"""

from __future__ import annotations

from collections.abc import Sequence

from engine.block_pool import BlockPool


class BlockPins:
    def __init__(self, pool: BlockPool) -> None:
        self._pool = pool
        self._pins: dict[str, list[int]] = {}

    def pin(self, key: str, block_ids: Sequence[int]) -> None:
        for block_id in block_ids:
            if self._pool.ref_count(block_id) < 1:
                raise ValueError(f"block {block_id} is free; only blocks in use can be pinned")
        for block_id in block_ids:
            self._pool.acquire(block_id)
        self._pins.setdefault(key, []).extend(block_ids)

    def release(self, key: str) -> None:
        block_ids = self._pins.pop(key, [])
        self._pool.release(reversed(block_ids))

    def __contains__(self, key: object) -> bool:
        return key in self._pins

    @property
    def num_pinned(self) -> int:
        """Pinned requests."""
        return len(self._pins)
