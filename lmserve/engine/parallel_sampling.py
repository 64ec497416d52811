"""n / best_of: the first sequence of a request computes the prompt; once it has, it is forked
into the request's other samples, which share its KV blocks (copy-on-write) and its first
logits row. `Forker.fork` is also how beam search grows a beam into several."""

from __future__ import annotations

from collections.abc import Callable

from lmserve.engine.scheduler import Scheduler
from lmserve.engine.sequence import Request, Sequence


class Forker:
    def __init__(self, new_sequence: Callable[[Request, list[int]], Sequence], scheduler: Scheduler):
        self.new_sequence = new_sequence
        self.scheduler = scheduler

    def fork(self, parent: Sequence) -> Sequence:
        """A new sequence of the parent's request with the parent's tokens and KV blocks."""
        child = self.new_sequence(parent.request, list(parent.token_ids))
        self.scheduler.fork(parent, child)
        return child

    def fork_samples(self, sampling: list[Sequence]) -> list[int]:
        """Fork the first sequence of every n / best_of request that just computed its prompt
        into the request's other samples (appended to `sampling`). Returns the logits row of
        each entry of `sampling`."""
        rows = list(range(len(sampling)))
        for row, seq in enumerate(list(sampling)):
            request = seq.request
            for _ in range(request.pending_forks):
                sampling.append(self.fork(seq))
                rows.append(row)
            request.forked = True
        return rows
