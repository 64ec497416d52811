"""The contract between the scheduler and the model runner: what one engine step computes.

`Scheduler.schedule()` returns a `SchedulerOutput`; `ModelRunner.execute()` takes it, runs its
block operations (copy-on-write copies, swaps out and in, in the order they were decided: a block
freed by one may be reused by a later one) and then one forward over the scheduled tokens, and
returns logits for the sequences that sample; `Scheduler.update_from_output()` then advances
each sequence's computed tokens. The runner reads a sequence's tokens (and speculative
proposals), computed-token count and block table, nothing else of the scheduler or the block
manager.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import NamedTuple

from lmserve.engine.sequence import Sequence


class BlockOpKind(enum.Enum):
    COPY = "copy"  # device block -> device block (copy-on-write of a forked sequence)
    SWAP_OUT = "swap_out"  # device block -> swap-tier block (preemption by swapping)
    SWAP_IN = "swap_in"  # swap-tier block -> device block (readmission)


class BlockOp(NamedTuple):
    kind: BlockOpKind
    pairs: list[tuple[int, int]]  # (source block, destination block)


@dataclass
class ScheduledSequence:
    seq: Sequence
    num_tokens: int  # tokens computed for this sequence in this step, its proposed ones included
    num_spec_tokens: int = 0  # of which speculative proposals (`seq.spec_token_ids`), verified this step
    # True when this step reaches the sequence's last known token (and proposals), so a new token
    # is sampled; fixed when the step is scheduled
    samples: bool = field(init=False)
    # Scoring asks for the logits of every scheduled position, not only of the sampling ones.
    all_logits: bool = False

    def __post_init__(self):
        self.samples = self.seq.num_computed_tokens + self.num_tokens == self.seq.num_tokens + self.num_spec_tokens

    @property
    def num_logits(self) -> int:
        """Logits rows this sequence gets: one per proposal plus one, when it samples (every
        position's, for scoring)."""
        if self.all_logits:
            return self.num_tokens
        return 1 + self.num_spec_tokens if self.samples else 0


@dataclass
class SchedulerOutput:
    """One step: the sequences that run (in batch order, each with its token count) and the
    block operations to run before the forward. Iterating it yields the scheduled sequences."""

    scheduled: list[ScheduledSequence] = field(default_factory=list)
    block_ops: list[BlockOp] = field(default_factory=list)

    def __iter__(self):
        return iter(self.scheduled)
