"""Speculative decoding: proposers guess the next tokens of running sequences, the model checks
them in the same step as everything else, and the longest right prefix is kept.

Proposers: `NgramProposer` (prompt lookup, no model) and `draft_model.DraftModelProposer` (a
smaller model sampling from its own distribution q). Before a step, `Speculator.propose` gives each eligible running sequence (decoding, opted in,
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
Proposals sampled from a draft model's q go through `rejection_sample` instead: the published
test with min(1, p/q) and the residual max(0, p - q). Either way outputs follow the target's
distribution (greedy: the longest prefix equal to the argmax). The K/V slots of rejected proposals are given back (`Scheduler.accept_proposals`);
block tables and the prefix cache only ever hold accepted tokens.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from numpy.lib.stride_tricks import sliding_window_view

from lmserve.config import SpeculativeConfig
from lmserve.engine.sequence import Sequence

logger = logging.getLogger("lmserve")

# A draft model speculates only when the row cap leaves each sequence at least this many
# proposals (or all k asked for): measured with benchmarks/bench_speculative.py --method draft
# (SmolLM2 fp32 target, Q4_1 draft, 2 cores): 2 proposals per sequence were 0.93x at batch 1, and
# 1 each at batch 8 was 0.82x, while 4 at batch 1 gave 1.8x.
DRAFT_MIN_PROPOSALS = 3


class NgramProposer:
    """Prompt lookup: the tokens that followed the latest earlier occurrence of the sequence's
    last n tokens (n from `ngram_max` down to `ngram_min`), in prompt + output. No model."""

    def __init__(self, ngram_min: int, ngram_max: int):
        self.ngram_min, self.ngram_max = ngram_min, ngram_max

    def propose(self, items: list[tuple[Sequence, int]]) -> None:
        """Set each sequence's `spec_token_ids`, at most `room` of them."""
        for seq, room in items:
            seq.spec_token_ids = self.lookup(seq.token_ids, room)

    def release(self, seq: Sequence) -> None:
        """Nothing is kept per sequence."""

    def lookup(self, token_ids: list[int], k: int) -> list[int]:
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
    def __init__(self, config: SpeculativeConfig, max_model_len: int, proposer=None):
        """`proposer` proposes for the "draft" method (a `DraftModelProposer`); n-gram lookup
        is built here."""
        self.config = config
        self.max_model_len = max_model_len
        self.proposer = proposer if proposer is not None else NgramProposer(config.ngram_min, config.ngram_max)
        self.stats = SpecStats()
        logger.info("speculative decoding: %s, up to %d proposals per sequence and %d verification rows per step",
                    config.method, config.num_speculative_tokens, config.max_verify_rows)

    def propose(self, running: list[Sequence]) -> None:
        """Fill `spec_token_ids` of the running sequences that may speculate this step."""
        start = time.perf_counter()
        k = self.config.num_speculative_tokens
        per_seq = min(k, self.config.max_verify_rows // max(1, len(running)) - 1)
        if self.config.method == "draft" and per_seq < min(k, DRAFT_MIN_PROPOSALS):
            per_seq = 0  # a draft round for so few proposals costs more than it saves
        eligible = []
        for seq in running:
            seq.spec_token_ids, seq.spec_draft_probs = [], None
            room = self._room(seq, per_seq)
            if room > 0:
                eligible.append((seq, room))
        self.proposer.propose(eligible)
        self.stats.proposer_seconds += time.perf_counter() - start

    def release(self, seq: Sequence) -> None:
        """`seq` finished: the proposer forgets it (a draft model frees its blocks)."""
        self.proposer.release(seq)

    def _room(self, seq: Sequence, limit: int) -> int:
        """How many proposals `seq` may take, at most `limit`: 0 unless it is decoding, opted in
        and unconstrained (structured output does not speculate yet); never past max_tokens or
        the context limit (the step also adds one token of its own)."""
        params = seq.params
        if limit <= 0 or not params.speculative or seq.request.beam is not None or seq.grammar is not None \
                or seq.num_tokens - seq.num_computed_tokens != 1:
            return 0
        room = min(limit, self.max_model_len - seq.num_tokens - 1)
        if params.max_tokens is not None:
            room = min(room, params.max_tokens - seq.num_output_tokens - 1)
        return room

    def accepted_tokens(self, proposals: list[int], sampled: list[int]) -> list[int]:
        """The tokens a verification step emits for deterministic proposals (or a greedy
        request): the proposals while the row's sample equals them, then the first differing
        sample (or the bonus sample of the last row)."""
        accepted = 0
        while accepted < len(proposals) and sampled[accepted] == proposals[accepted]:
            accepted += 1
        self._count(len(proposals), accepted)
        return sampled[: accepted + 1]

    def rejection_sample(self, seq: Sequence, target_probs: torch.Tensor) -> list[int]:
        """The tokens a verification step emits for proposals drawn from a draft distribution q
        (`seq.spec_draft_probs`, [k, V]) given the target's p (`target_probs`, [k + 1, V]):
        proposal d is accepted with probability min(1, p(d) / q(d)); the first rejected one is
        replaced by a draw from max(0, p - q) normalised; when all are accepted, a bonus token
        is drawn from the last row of p. Draws use the request's own generator."""
        proposals, q, generator = seq.spec_token_ids, seq.spec_draft_probs, seq.generator
        p = target_probs.to(q.device, torch.float64)
        q = q.double()
        uniforms = torch.rand(len(proposals), generator=generator, device=generator.device, dtype=torch.float64)
        tokens = []
        for j, token in enumerate(proposals):
            if uniforms[j] * q[j, token] <= p[j, token]:  # u <= p / q without dividing by a tiny q
                tokens.append(token)
                continue
            residual = (p[j] - q[j]).clamp_(min=0)
            total = residual.sum()
            residual = residual / total if total > 0 else p[j]
            tokens.append(_draw(residual, generator))
            self._count(len(proposals), j)
            return tokens
        tokens.append(_draw(p[len(proposals)], generator))
        self._count(len(proposals), len(proposals))
        return tokens

    def _count(self, proposed: int, accepted: int) -> None:
        self.stats.num_proposed += proposed
        self.stats.num_accepted += accepted
        self.stats.num_verifications += 1


def _draw(probs: torch.Tensor, generator: torch.Generator) -> int:
    return int(torch.multinomial(probs.to(generator.device), 1, generator=generator))
