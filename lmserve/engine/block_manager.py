"""Fixed-size KV blocks: a free pool, reference counts, per-sequence block tables and the
automatic prefix cache.

A block holds `block_size` consecutive token positions of one sequence. A sequence's block
table lists its blocks in order, so token position p lives in slot
`block_table[p // block_size] * block_size + p % block_size` of every layer's cache.

Prefix caching: once a block is full, it is registered under a chained hash of its token ids
(the parent block's hash, the block's tokens and a salt for anything else that changes K/V: the
model and dtypes, and the request's LoRA adapter).
A new sequence whose leading full blocks hash the same reuses them instead of recomputing.
Freed blocks keep their contents and hash in the free pool, which is ordered least recently
used first, so a cached block survives until the pool needs it for something else.

Forks and copy-on-write: `fork` gives a child sequence the parent's whole block table, partial
last block included, by raising reference counts. Before a sequence writes into a block that
another table also references, `allocate` gives it a fresh block and queues a (src, dst) copy.

Swap: a preempted sequence's blocks can be copied to a second tier of `num_swap_blocks` blocks
(`swap_out`) and copied back into fresh device blocks when it is rescheduled (`swap_in`).

Sliding window: when every layer attends only the last `sliding_window` positions, blocks that
lie entirely before the window of the next token to compute are released; their table entries
become NO_BLOCK and no attention reads them again (the window mask excludes those positions).

Copies and swaps are queued as `BlockOp`s, in the order they were decided; the scheduler hands
them to the model runner in its `SchedulerOutput`, to run before the step's forward: a block freed
by one operation may be reused by a later one in the same step.
"""

from __future__ import annotations

from collections import OrderedDict

from lmserve.engine.scheduler_output import BlockOp, BlockOpKind
from lmserve.engine.sequence import Sequence

NO_BLOCK = -1  # table entry of a block dropped from a sliding window or swapped out

COPY, SWAP_OUT, SWAP_IN = BlockOpKind.COPY, BlockOpKind.SWAP_OUT, BlockOpKind.SWAP_IN


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, salt: str = "",
                 num_swap_blocks: int = 0, sliding_window: int | None = None):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.salt = salt
        self.sliding_window = sliding_window
        self.num_swap_blocks = num_swap_blocks
        self.free_swap_blocks = list(range(num_swap_blocks))
        self.pending_ops: list[BlockOp] = []
        self.num_dropped_blocks = 0  # blocks released because they left the sliding window
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

    def _release(self, block: int) -> None:
        self.ref_counts[block] -= 1
        if self.ref_counts[block] == 0:
            self.free_blocks[block] = None

    def _pop_free(self) -> int:
        block, _ = self.free_blocks.popitem(last=False)
        stale = self.block_hash[block]
        if stale is not None:  # evict the least recently used cached block
            self.cached.pop(stale, None)
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _queue(self, kind: BlockOpKind, pair: tuple[int, int]) -> None:
        if self.pending_ops and self.pending_ops[-1].kind == kind:
            self.pending_ops[-1].pairs.append(pair)
        else:
            self.pending_ops.append(BlockOp(kind, [pair]))

    def take_block_ops(self) -> list[BlockOp]:
        """The copies and swaps queued since the last call, in the order they were decided."""
        ops, self.pending_ops = self.pending_ops, []
        return ops

    def _shared_in_write_range(self, seq: Sequence, num_tokens: int) -> list[int]:
        """Table indices of blocks `seq` is about to write (positions computed..num_tokens) that
        another table also references."""
        first = seq.num_computed_tokens // self.block_size
        last = min(len(seq.block_table), self.blocks_for(num_tokens))
        return [i for i in range(first, last) if self.ref_counts[seq.block_table[i]] > 1]

    def drop_out_of_window(self, seq: Sequence) -> None:
        """Release the blocks no query from the next token to compute on can attend."""
        if self.sliding_window is None:
            return
        first_needed = max(0, seq.num_computed_tokens - self.sliding_window + 1)  # oldest key position still read
        for i in range(first_needed // self.block_size):
            if seq.block_table[i] != NO_BLOCK:
                self._release(seq.block_table[i])
                seq.block_table[i] = NO_BLOCK
                self.num_dropped_blocks += 1

    def allocate(self, seq: Sequence, num_tokens: int) -> bool:
        """Give `seq` writable slots for positions computed..num_tokens: new blocks at the end and
        private copies of shared blocks it writes into. False (and no allocation) if the pool is
        short; blocks that left the sliding window are released either way."""
        self.drop_out_of_window(seq)
        shared = self._shared_in_write_range(seq, num_tokens)
        needed = self.num_new_blocks(seq, num_tokens)
        if needed + len(shared) > len(self.free_blocks):
            return False
        for i in shared:
            source, copy = seq.block_table[i], self._pop_free()
            self._release(source)
            seq.block_table[i] = copy
            if i * self.block_size < seq.num_computed_tokens:  # keep the positions already computed
                self._queue(COPY, (source, copy))
        for _ in range(needed):
            seq.block_table.append(self._pop_free())
        return True

    def trim(self, seq: Sequence, num_tokens: int) -> None:
        """Release the blocks at the end of `seq`'s table that no position below `num_tokens`
        uses (slots of rejected speculative tokens)."""
        keep = self.blocks_for(num_tokens)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            if block != NO_BLOCK:
                self._release(block)

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Make `child` share all of `parent`'s blocks and computed state (copy-on-write)."""
        for block in parent.block_table:
            if block != NO_BLOCK:
                self._take(block)
        child.block_table = list(parent.block_table)
        child.block_hashes = list(parent.block_hashes)
        child.num_registered_blocks = parent.num_registered_blocks
        child.num_computed_tokens = parent.num_computed_tokens

    def can_swap_out(self, seq: Sequence) -> bool:
        return sum(b != NO_BLOCK for b in seq.block_table) <= len(self.free_swap_blocks)

    def swap_out(self, seq: Sequence) -> None:
        """Copy `seq`'s blocks to the swap tier and release them (check `can_swap_out` first)."""
        seq.swap_table = [NO_BLOCK] * len(seq.block_table)
        for i, block in enumerate(seq.block_table):
            if block != NO_BLOCK:
                seq.swap_table[i] = self.free_swap_blocks.pop()
                self._queue(SWAP_OUT, (block, seq.swap_table[i]))
                self._release(block)
                seq.block_table[i] = NO_BLOCK

    def blocks_to_swap_in(self, seq: Sequence, num_tokens: int) -> int:
        """Device blocks a swapped `seq` needs to come back and then cover `num_tokens` positions."""
        return sum(b != NO_BLOCK for b in seq.swap_table) + self.num_new_blocks(seq, num_tokens)

    def swap_in(self, seq: Sequence) -> None:
        """Copy a swapped `seq`'s blocks back into fresh device blocks (check `blocks_to_swap_in`)."""
        for i, swap_block in enumerate(seq.swap_table):
            if swap_block != NO_BLOCK:
                seq.block_table[i] = self._pop_free()
                self._queue(SWAP_IN, (swap_block, seq.block_table[i]))
                self.free_swap_blocks.append(swap_block)
        seq.swap_table = []

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
            if block != NO_BLOCK and h not in self.cached and self.block_hash[block] is None:
                self.cached[h] = block
                self.block_hash[block] = h
        seq.num_registered_blocks = max(seq.num_registered_blocks, full)

    def _extend_hashes(self, seq: Sequence, num_blocks: int) -> None:
        bs = self.block_size
        for i in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[i - 1] if i else self.salt + seq.request.cache_salt
            seq.block_hashes.append(hash((parent, tuple(seq.token_ids[i * bs: (i + 1) * bs]))))

    def free(self, seq: Sequence) -> None:
        """Release all of `seq`'s device and swap blocks."""
        # Tail blocks go into the pool first, so they are evicted before the shared prefix.
        for block in reversed(seq.block_table):
            if block != NO_BLOCK:
                self._release(block)
        self.free_swap_blocks.extend(b for b in seq.swap_table if b != NO_BLOCK)
        seq.block_table = []
        seq.swap_table = []
        seq.num_registered_blocks = 0

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size
