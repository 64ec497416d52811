"""Speculative decoding: proposers guess the next tokens of running sequences, the model checks
them in the same step as everything else, and the longest right prefix is kept.

Before a step, `Speculator.propose` gives each eligible running sequence (decoding, opted in,
not a beam, room left under max_tokens and the context limit) up to k proposals in
`seq.spec_token_ids`; the scheduler schedules 1 + k tokens for it within the token budget, and
the runner returns 1 + k logits rows (the target's next-token distribution after the last known
token and after each proposal).

Verification (`accepted_tokens`) samples every row with the request's own sampler settings and
generator, as a normal decode step would (row j sees the proposals before it as generated
tokens, for penalties), and keeps proposals while the sampled token equals the proposal; the
first differing sample is the step's last token, or, when all k match, the sample of row k (the
bonus token). A proposer that proposes deterministically (n-gram lookup) has q = a point mass,
so this is exactly rejection sampling: proposal d is accepted with probability p(d) = min(1, p/q),
and on rejection the sample is drawn from p without d, renormalised = max(0, p - q) normalised.
Outputs therefore follow the target's distribution (greedy: the longest prefix equal to the
argmax). The K/V slots of rejected proposals are given back (`Scheduler.accept_proposals`);
block tables and the prefix cache only ever hold accepted tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from lmserve.config import SpeculativeConfig
from lmserve.engine.sequence import Sequence

logger = logging.getLogger("lmserve")


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    last n tokens (n from `ngram_max` down to `ngram_min`), in prompt + output. No model."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, token_ids: list[int], k: int) -> list[int]:
        tokens = np.asarray(token_ids, dtype=np.int64)
        for n in range(min(self.ngram_max, len(tokens) - 1), self.ngram_min - 1, -1):
            # windows of the earlier tokens only: one ending at the last token would match itself
            windows = sliding_window_view(tokens[:-1], n)
            hits = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if hits.size:
                start = int(hits[-1]) + n
                return tokens[start: start + k].tolist()
        return []


@dataclass
class SpecStats:
    """Running totals of speculative decoding."""

    num_proposed: int = 0  # proposals verified
    num_accepted: int = 0  # of which accepted
    num_verifications: int = 0  # sequence-steps that verified at least one proposal
    proposer_seconds: float = 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted / self.num_proposed if self.num_proposed else 0.0

    @property
    def mean_accepted(self) -> float:
        """Proposals accepted per verifying sequence-step (tokens per step minus the one every step makes)."""
        return self.num_accepted / self.num_verifications if self.num_verifications else 0.0


class Speculator:
    def __init__(self, config: SpeculativeConfig, max_model_len: int):
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = NgramProposer(config.ngram_min, config.ngram_max)
        self.stats = SpecStats()
        logger.info("speculative decoding: %s, up to %d proposals per sequence and %d verification rows per step",
                    config.method, config.num_speculative_tokens, config.max_verify_rows)

    def propose(self, running: list[Sequence]) -> None:
        """Fill `spec_token_ids` of the running sequences that may speculate this step."""
        start = time.perf_counter()
        per_seq = min(self.config.num_speculative_tokens, self.config.max_verify_rows // max(1, len(running)) - 1)
        for seq in running:
            room = self._room(seq, per_seq)
            seq.spec_token_ids = self.proposer.propose(seq.token_ids, room) if room > 0 else []
        self.stats.proposer_seconds += time.perf_counter() - start

    def _room(self, seq: Sequence, limit: int) -> int:
        """How many proposals `seq` may take, at most `limit`: 0 unless it is decoding, opted in
        and unconstrained (structured output does not speculate yet); never past max_tokens or the context limit (the step also adds one token of its own)."""
        params = seq.params
        if limit <= 0 or not params.speculative or seq.request.beam is not None or seq.grammar is not None \
                or seq.num_tokens - seq.num_computed_tokens != 1:
            return 0
        room = min(limit, self.max_model_len - seq.num_tokens - 1)
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - seq.num_output_tokens - 1)
        return room

    def accepted_tokens(self, proposals: list[int], sampled: list[int]) -> list[int]:
        """The tokens a verification step emits: the proposals while the row's sample equals
        them, then the first differing sample (or the bonus sample of the last row)."""
        accepted = 0
        while accepted < len(proposals) and sampled[accepted] == proposals[accepted]:
            accepted += 1
        self.stats.num_proposed += len(proposals)
        self.stats.num_accepted += accepted
        self.stats.num_verifications += 1
        return sampled[: accepted + 1]
