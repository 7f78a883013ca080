"""The paged KV block pool: a free list with ref counts and an LRU prefix cache.

A block is in use while its ref count is above zero. A freed block that holds a full,
hashed prefix stays findable by its hash until the pool needs the space: free blocks
are handed out oldest-freed first, and taking a cached one evicts its hash. Cache
add/evict events go to an optional listener (the prefix-block index).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import Enum


class CacheEvent(Enum):
    ADD = "add"
    EVICT = "evict"


CacheListener = Callable[[CacheEvent, int], None]


class OutOfBlocksError(RuntimeError):
    pass


@dataclass
class PoolStats:
    prefix_queries: int = 0  # full blocks looked up
    prefix_hits: int = 0  # of which found in the cache
    evictions: int = 0


class BlockPool:
    def __init__(self, num_blocks: int, listener: CacheListener | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self._ref = [0] * num_blocks
        self._hash: list[int | None] = [None] * num_blocks
        self._by_hash: dict[int, int] = {}
        # Free blocks in eviction order (oldest first). Values are unused.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._listener = listener
        # Bumped each time a block is handed out afresh: a block whose generation is
        # unchanged still holds what its last owner wrote.
        self._generation = [0] * num_blocks
        self.stats = PoolStats()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def ref_count(self, block_id: int) -> int:
        return self._ref[block_id]

    def allocate(self, n: int) -> list[int]:
        """Take `n` free blocks (evicting cached prefixes if needed), each with ref 1."""
        if n > len(self._free):
            raise OutOfBlocksError(f"need {n} blocks, {len(self._free)} free")
        out = []
        for _ in range(n):
            block_id, _ = self._free.popitem(last=False)
            self._evict(block_id)
            self._ref[block_id] = 1
            self._generation[block_id] += 1
            out.append(block_id)
        return out

    def generation(self, block_id: int) -> int:
        return self._generation[block_id]

    def reclaim(self, block_id: int, generation: int) -> bool:
        """Take a reference to a block its last owner let go of, if it has not been
        handed out since (so it still holds what that owner wrote); False otherwise."""
        if self._generation[block_id] != generation:
            return False
        self.acquire(block_id)
        return True

    def lookup(self, block_hash: int) -> int | None:
        """The block caching `block_hash`, or None. Counts toward the hit rate."""
        self.stats.prefix_queries += 1
        block_id = self._by_hash.get(block_hash)
        if block_id is not None:
            self.stats.prefix_hits += 1
        return block_id

    def acquire(self, block_id: int) -> None:
        """Add a reference to a cached block (a prefix hit)."""
        if self._ref[block_id] == 0:
            del self._free[block_id]
        self._ref[block_id] += 1

    def release(self, block_ids: Iterable[int]) -> None:
        """Drop one reference from each block; blocks reaching zero become free.

        Callers pass a sequence's blocks tail first, so a prefix's tail is evicted
        before its head.
        """
        for block_id in block_ids:
            if self._ref[block_id] <= 0:
                raise RuntimeError(f"block {block_id} released more often than acquired")
            self._ref[block_id] -= 1
            if self._ref[block_id] == 0:
                self._free[block_id] = None

    def cache(self, block_id: int, block_hash: int) -> None:
        """Make a full, in-use block findable by its prefix hash (idempotent)."""
        if self._hash[block_id] is not None or block_hash in self._by_hash:
            return
        self._hash[block_id] = block_hash
        self._by_hash[block_hash] = block_id
        if self._listener:
            self._listener(CacheEvent.ADD, block_hash)

    def reset_cache(self) -> None:
        """Forget every cached prefix held by a free block."""
        for block_id in list(self._free):
            self._evict(block_id)

    def _evict(self, block_id: int) -> None:
        block_hash = self._hash[block_id]
        if block_hash is None:
            return
        self._hash[block_id] = None
        del self._by_hash[block_hash]
        self.stats.evictions += 1
        if self._listener:
            self._listener(CacheEvent.EVICT, block_hash)
