"""Per-sequence block tables on top of the block pool.

The scheduler asks it four things: how much of a new prompt is already cached
(`match_prefix`), to grow a sequence's table so the next chunk fits (`grow`), and to
give a sequence's blocks back when it ends (`free`) or is preempted (`preempt`). After
a step it publishes each newly full block's chained hash (`cache_full_blocks`), so later
requests can reuse it.
"""

from __future__ import annotations

from engine.block_pool import BlockPool
from engine.sequence import Sequence


class BlockManager:
    def __init__(self, pool: BlockPool, block_size: int, enable_prefix_caching: bool) -> None:
        self.pool = pool
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks for the sequence's longest cached prefix; without prefix
        caching, the leading blocks it computed before it was preempted, as long as
        they were not handed out since (no other request ever sees them).

        At least one token is left to compute, since its logits pick the next token.
        """
        if seq.block_table:
            return
        limit = (seq.num_tokens - 1) // self.block_size
        if self.prefix_caching:
            for block_hash in seq.block_hashes(limit * self.block_size):
                block_id = self.pool.lookup(block_hash)
                if block_id is None:
                    break
                self.pool.acquire(block_id)
                seq.block_table.append(block_id)
        else:
            for block_id, generation in seq.retained_blocks[:limit]:
                if not self.pool.reclaim(block_id, generation):
                    break
                seq.block_table.append(block_id)
        seq.num_computed = len(seq.block_table) * self.block_size
        seq.num_published_blocks = len(seq.block_table)

    def grow(self, seq: Sequence, num_tokens: int) -> bool:
        """Ensure blocks for the first `num_tokens` tokens; False if the pool is short."""
        need = self.blocks_for(num_tokens) - len(seq.block_table)
        if need <= 0:
            return True
        if need > self.pool.num_free:
            return False
        seq.block_table.extend(self.pool.allocate(need))
        return True

    def cache_full_blocks(self, seq: Sequence) -> None:
        if not self.prefix_caching:
            return
        hashes = seq.block_hashes(seq.num_computed)
        for i in range(seq.num_published_blocks, len(hashes)):
            self.pool.cache(seq.block_table[i], hashes[i])
        seq.num_published_blocks = len(hashes)

    def preempt(self, seq: Sequence) -> None:
        """Free a preempted sequence's blocks. Without prefix caching, remember the full
        ones it computed, so that its recompute can take back those still intact (a
        block that is pinned, or not yet handed out again). With it, they stay findable
        by prefix hash."""
        if not self.prefix_caching:
            full = seq.block_table[: seq.num_computed // self.block_size]
            seq.retained_blocks = [(b, self.pool.generation(b)) for b in full]
        self.free(seq)

    def free(self, seq: Sequence) -> None:
        self.pool.release(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed = 0
        seq.num_published_blocks = 0
