"""Continuous batching at the iteration level.

Every step the scheduler decides which sequences run and how many tokens each contributes:
running sequences first (one decode token, or the next chunk of a prompt), then waiting ones in
arrival order while the token budget (`max_num_batched_tokens`), the sequence budget
(`max_num_seqs`) and the free KV blocks allow. A long prompt is split into chunks that fit the
budget, so it shares steps with other sequences' decode tokens. A sequence admitted from the
queue first adopts whatever prefix of it the block manager has cached (the n samples of one
request share their prompt's blocks this way). When a running sequence needs a
block and none is free, the newest running sequence is preempted: its blocks are freed and it
goes back to the front of the queue, to be recomputed from its tokens later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.sequence import Sequence, SequenceStatus


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens computed for this sequence in this step

    @property
    def samples(self) -> bool:
        """True when this step reaches the sequence's last known token, so a new token is sampled."""
        return self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Take a finished or aborted sequence out of the queues and free its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)

    def _waits_for_sibling(self, seq: Sequence) -> bool:
        """With prefix caching, the n samples of one request share the prompt's blocks: samples
        after the first start only once the first has computed its prompt, then adopt its cached
        blocks and recompute at most the last, partial one."""
        if not self.block_manager.enable_prefix_caching or seq.index == 0 or seq.num_output_tokens:
            return False
        first = seq.request.seqs[0]
        return not first.is_finished and first.num_output_tokens == 0

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
            i += 1
        # After a preemption the pool is known to be short: admit nobody new this step.
        admitted = []
        for seq in list(self.waiting) if not preempted else []:
            if budget <= 0 or len(self.running) >= self.max_num_seqs:
                break
            if self._waits_for_sibling(seq):
                continue
            self.block_manager.reuse_cached_prefix(seq)
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                self.block_manager.free(seq)
                seq.num_computed_tokens = 0
                break
            self.block_manager.record_admission(seq.num_tokens, seq.num_computed_tokens)
            admitted.append(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)
        return scheduled
