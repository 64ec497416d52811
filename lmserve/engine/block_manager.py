"""Fixed-size KV blocks: a free pool, reference counts, per-sequence block tables and the
automatic prefix cache.

A block holds `block_size` consecutive token positions of one sequence. A sequence's block
table lists its blocks in order, so token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size` of every layer's cache.

Prefix caching: once a block is full, it is registered under a chained hash of its token ids
(the parent block's hash, the block's tokens and a salt for anything else that changes K/V).
A new sequence whose leading full blocks hash the same reuses them instead of recomputing.
Freed blocks keep their contents and hash in the free pool, which is ordered least recently
used first, so a cached block survives until the pool needs it for something else.
"""

from __future__ import annotations

from collections import OrderedDict

from lmserve.engine.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, salt: str = ""):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt
        self.free_blocks: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))  # LRU first
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.cached: dict[int, int] = {}  # block hash -> block holding those tokens
        self.prefix_queries = 0  # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found cached

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_blocks)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self.free_blocks)

    @property
    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_new_blocks(self, seq: Sequence, num_tokens: int) -> int:
        """Blocks `seq` must gain so that its first `num_tokens` positions have slots."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            del self.free_blocks[block]
        self.ref_counts[block] += 1

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Grow `seq`'s block table to cover `num_tokens` positions; False (and no change) if the pool is short."""
        needed = self.num_new_blocks(seq, num_tokens)
        if needed > len(self.free_blocks):
            return False
        for _ in range(needed):
            block, _ = self.free_blocks.popitem(last=False)
            stale = self.block_hash[block]
            if stale is not None:  # evict the least recently used cached block
                self.cached.pop(stale, None)
                self.block_hash[block] = None
            self.ref_counts[block] = 1
            seq.block_table.append(block)
        return True

    def reuse_cached_prefix(self, seq: Sequence) -> None:
        """For a sequence with nothing computed, adopt the cached blocks of its longest cached
        prefix and mark those tokens computed. At least one token is left to compute, since the
        step that samples the next token needs its logits."""
        if not self.enable_prefix_caching or seq.num_computed_tokens or seq.block_table:
            return
        self._extend_hashes(seq, (seq.num_tokens - 1) // self.block_size)
        for h in seq.block_hashes[: (seq.num_tokens - 1) // self.block_size]:
            block = self.cached.get(h)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    def record_admission(self, num_tokens: int, num_cached_tokens: int) -> None:
        """Count an admitted sequence's prefix-cache lookup in the hit-rate statistics."""
        if self.enable_prefix_caching:
            self.prefix_queries += num_tokens
            self.prefix_hits += num_cached_tokens

    def register_full_blocks(self, seq: Sequence) -> None:
        """Enter the blocks `seq` has completely computed into the prefix cache."""
        if not self.enable_prefix_caching:
            return
        full = seq.num_computed_tokens // self.block_size
        self._extend_hashes(seq, full)
        for i in range(seq.num_registered_blocks, full):
            h, block = seq.block_hashes[i], seq.block_table[i]
            if h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block] = h
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else self.salt
            seq.block_hashes.append(hash((parent, tuple(seq.token_ids[i * bs: (i + 1) * bs]))))

    def free(self, seq: Sequence) -> None:
        # Tail blocks go into the pool first, so they are evicted before the shared prefix.
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                self.free_blocks[block] = None
        seq.block_table = []
        seq.num_registered_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
