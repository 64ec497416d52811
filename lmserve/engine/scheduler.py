"""Continuous batching at the iteration level.

Every step the scheduler decides which sequences run and how many tokens each contributes:
running sequences first (one decode token, or the next chunk of a prompt), then waiting ones in
arrival order while the token budget (`max_num_batched_tokens`), the sequence budget
(`max_num_seqs`) and the free KV blocks allow; a request on a LoRA adapter waits while
`max_loras` other adapters are running. A long prompt is split into chunks that fit the
budget, so it shares steps with other sequences' decode tokens. While D sequences decode, the
prompt tokens of a step are capped at the budget / (D + 1) (at least `MIN_PREFILL_CHUNK`): a
step's time grows with its prompt tokens, and every decoding stream waits for the step, so the
more streams decode, the smaller the chunk that keeps their token cadence (with nothing
decoding, a prompt gets the whole budget, for the shortest time to first token). A sequence
admitted from the queue first adopts whatever prefix of it the block manager has cached. A
request that will fork (n / best_of samples, beams) is admitted only if all its sequences fit
`max_num_seqs`.

When a running sequence needs a block and none is free, the newest running sequence is
preempted and goes back to the front of the queue. Under `preemption_mode="recompute"` its
blocks are freed and it is recomputed from its tokens later; under "swap" its blocks are copied
to the swap tier and copied back when it is readmitted (recompute when the swap tier is full).

A beam whose next-token log-probs wait for its siblings' has nothing to compute: it is skipped
while running, and if nothing else can run it is preempted to make room for the queue; a
preempted one is not readmitted before the beam step has extended it.
"""

from __future__ import annotations

from collections import deque

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from lmserve.engine.sequence import Sequence, SequenceStatus


# The smallest prompt chunk a step takes while others decode: past 32 rows a step dequantizes
# every packed weight once for its GEMMs, which a chunk of 256 tokens outweighs several times
# (and the usual chat prompt then still prefills in one step).
MIN_PREFILL_CHUNK = 256


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 preemption_mode: str = "recompute", max_loras: int = 1 << 30):
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.preemption_mode = preemption_mode
        self.max_loras = max_loras  # different LoRA adapters among the running sequences
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_swap_outs = 0  # preemptions that went to the swap tier rather than recompute

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

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Queue `child` as a copy of `parent` sharing its KV blocks; a parent that is not running
        (preempted) passes on only its tokens, and the child is computed from scratch."""
        if parent.status == SequenceStatus.RUNNING:
            self.block_manager.fork(parent, child)
            child.status = SequenceStatus.RUNNING
            self.running.append(child)
        else:
            child.status = SequenceStatus.WAITING
            self.waiting.append(child)

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        seq.spec_token_ids.clear()
        if self.preemption_mode == "swap" and self.block_manager.can_swap_out(seq):
            self.block_manager.swap_out(seq)
            seq.status = SequenceStatus.SWAPPED
            self.num_swap_outs += 1
        else:
            self.block_manager.free(seq)
            seq.num_computed_tokens = 0
            seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def _admit(self, seq: Sequence, budget: int) -> int | None:
        """Give a waiting sequence its blocks; the number of tokens it computes this step, or None
        if the pool is short."""
        bm = self.block_manager
        if seq.status == SequenceStatus.SWAPPED:
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if bm.blocks_to_swap_in(seq, seq.num_computed_tokens + n) > bm.num_free_blocks:
                return None
            bm.swap_in(seq)
            bm.allocate(seq, seq.num_computed_tokens + n)
            return n
        bm.reuse_cached_prefix(seq)
        n = min(seq.num_tokens - seq.num_computed_tokens, budget)
        if not bm.allocate(seq, seq.num_computed_tokens + n):
            bm.free(seq)
            seq.num_computed_tokens = 0
            return None
        bm.record_admission(seq.num_tokens, seq.num_computed_tokens)
        return n

    def schedule(self) -> SchedulerOutput:
        """The next step: the sequences that run and the block copies and swaps to run first."""
        scheduled = self._schedule()
        while not scheduled and self.waiting and self.running:
            self._preempt(self.running[-1])  # only stalled sequences run: make room for the queue
            scheduled = self._schedule()
        return SchedulerOutput(scheduled, self.block_manager.take_block_ops())

    def update_from_output(self, output: SchedulerOutput) -> list[ScheduledSequence]:
        """After the step's forward: its known tokens are computed (full blocks enter the prefix
        cache); speculative proposals count only once accepted (`accept_proposals`). Returns the
        scheduled sequences that sample, in the order of the logits rows."""
        sampling = [r for r in output if r.samples]
        for r in output:
            r.seq.num_computed_tokens += r.num_tokens - r.num_spec_tokens
            self.block_manager.register_full_blocks(r.seq)
        return sampling

    def accept_proposals(self, seq: Sequence, num_accepted: int) -> None:
        """The first `num_accepted` proposals verified this step were right: their K/V are kept
        (they must already be appended to `seq.token_ids`); the slots of the rest are given up,
        with any block that holds nothing else."""
        seq.num_computed_tokens += num_accepted
        seq.spec_token_ids.clear()
        self.block_manager.trim(seq, seq.num_computed_tokens + 1)
        self.block_manager.register_full_blocks(seq)

    def _prompt_budget(self) -> int:
        """How many prompt tokens this step may take: the budget shared with the decoding streams."""
        decoding = sum(1 for s in self.running if s.num_tokens - s.num_computed_tokens == 1)
        if decoding == 0:
            return self.max_num_batched_tokens
        share = self.max_num_batched_tokens // (decoding + 1)
        return max(min(MIN_PREFILL_CHUNK, self.max_num_batched_tokens), share)

    def _schedule(self) -> list[ScheduledSequence]:
        budget = self.max_num_batched_tokens
        prompt_budget = self._prompt_budget()
        scheduled: list[ScheduledSequence] = []
        preempted = False
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            pending = seq.num_tokens - seq.num_computed_tokens
            if pending > 1 and prompt_budget <= 0:  # a prompt chunk, and this step has its share
                i += 1
                continue
            n = min(pending + len(seq.spec_token_ids), budget) if pending == 1 else min(pending, budget, prompt_budget)
            del seq.spec_token_ids[max(0, n - pending):]  # proposals beyond the budget wait
            if seq.awaits_beam_step:
                i += 1
                continue
            while not self.block_manager.allocate(seq, seq.num_computed_tokens + n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status != SequenceStatus.RUNNING:
                break
            scheduled.append(ScheduledSequence(seq, n, len(seq.spec_token_ids)))
            budget -= n
            if pending > 1:
                prompt_budget -= n
            i += 1
        # After a preemption the pool is known to be short: admit nobody new this step.
        admitted = []
        num_seqs = len(self.running) + sum(s.request.pending_forks for s in self.running)  # forks to come
        adapters = {s.request.lora for s in self.running} - {None}
        for seq in list(self.waiting) if not preempted else []:
            if budget <= 0 or num_seqs + 1 + seq.request.pending_forks > self.max_num_seqs:
                break
            lora = seq.request.lora
            if seq.awaits_beam_step or (lora is not None and lora not in adapters and len(adapters) >= self.max_loras):
                continue
            pending = seq.num_tokens - seq.num_computed_tokens
            limit = budget if pending == 1 else min(budget, prompt_budget)  # a swapped-out decode, or a prompt
            if limit <= 0:
                break
            n = self._admit(seq, limit)
            if n is None:
                break
            if pending > 1:
                prompt_budget -= n
            admitted.append(seq)
            if lora is not None:
                adapters.add(lora)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            num_seqs += 1 + seq.request.pending_forks
            scheduled.append(ScheduledSequence(seq, n))
            budget -= n
        for seq in admitted:
            self.waiting.remove(seq)
        return scheduled
