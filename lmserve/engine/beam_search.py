"""Beam search: its scoring and finishing rules (`BeamSearch`), and how the engine's sequences
follow them (`record_beam_logprobs`, `beam_output`).

One `BeamSearch` per request. Each beam step receives the live beams' next-token log-probs and
returns which (beam, token) continuations live on; `record_beam_logprobs` turns them into
sequences, forking a beam's KV blocks when it has several continuations. The rules are those of
transformers' `generate(num_beams=k, do_sample=False)`:

- the top `(1 + number of EOS ids) * k` (at least 2k) candidates by cumulative log-prob are
  considered, best first;
- a candidate that ends with EOS, or reaches max_tokens, becomes a finished hypothesis if it is
  among the first k candidates, scored cum_logprob / (generated tokens ** length_penalty); the
  best k finished hypotheses are kept;
- the best k other candidates are the next live beams;
- the search ends when max_tokens is reached, when `early_stopping=True` and k hypotheses are
  finished, or when the best live beam can no longer beat the worst finished hypothesis (scored
  at its current length, or at max_tokens with `early_stopping="never"` and a positive penalty).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lmserve.engine.sequence import Request, Sequence
from lmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lmserve.sampling_params import BeamSearchParams


def beam_score(cum_logprob: float, num_generated: int, length_penalty: float) -> float:
    """What hypotheses are ranked by: the log-probability divided by length ** length_penalty."""
    return cum_logprob / (num_generated ** length_penalty)


@dataclass
class Hypothesis:
    token_ids: list[int]  # generated tokens
    cum_logprob: float
    score: float


@dataclass
class Continuation:
    beam: int  # index of the live beam it extends
    token: int
    cum_logprob: float


class BeamSearch:
    def __init__(self, params: BeamSearchParams, eos_token_ids: frozenset[int], max_tokens: int):
        self.params = params
        self.eos_token_ids = frozenset() if params.ignore_eos else eos_token_ids
        self.max_tokens = max_tokens
        self.finished: list[Hypothesis] = []  # best first, at most beam_width
        self.improvable = True  # transformers' early-stop heuristic is not yet satisfied
        self.done = False

    def _score(self, cum_logprob: float, length: int) -> float:
        return beam_score(cum_logprob, length, self.params.length_penalty)

    def _accepts_finished(self) -> bool:
        """Whether this step's finished candidates may enter the kept hypotheses (decided once per
        step, before any of them is added)."""
        full = len(self.finished) == self.params.beam_width
        return self.improvable and not (self.params.early_stopping is True and full)

    def step(self, cum_logprobs: list[float], generated: list[list[int]],
             logprobs: torch.Tensor) -> list[Continuation]:
        """One beam step over the live beams (all with the same number of generated tokens):
        their cumulative log-probs, generated tokens and next-token log-probs [beams, vocab].
        Returns the next live beams, best first; sets `done` when the search is over."""
        width = self.params.beam_width
        vocab = logprobs.shape[-1]
        total = (logprobs.float() + torch.tensor(cum_logprobs, device=logprobs.device)[:, None]).flatten()
        num_candidates = min(max(2, 1 + len(self.eos_token_ids)) * width, total.numel())
        values, indices = total.topk(num_candidates)
        length = len(generated[0]) + 1  # generated tokens once a candidate is appended
        at_limit = length >= self.max_tokens
        survivors: list[Continuation] = []
        accepts_finished = self._accepts_finished()
        for rank, (value, index) in enumerate(zip(values.tolist(), indices.tolist())):
            beam, token = divmod(index, vocab)
            if at_limit or token in self.eos_token_ids:
                if rank < width and accepts_finished:
                    tokens = generated[beam] + [token]
                    self.finished.append(Hypothesis(tokens, value, self._score(value, len(tokens))))
            elif len(survivors) < width:
                survivors.append(Continuation(beam, token, value))
        self.finished.sort(key=lambda h: h.score, reverse=True)
        del self.finished[width:]
        self.done = at_limit or not survivors or not self._may_improve(survivors[0].cum_logprob, length) \
            or (self.params.early_stopping is True and len(self.finished) == width)
        return [] if self.done else survivors

    def _may_improve(self, best_live_logprob: float, length: int) -> bool:
        if len(self.finished) == self.params.beam_width:
            if self.params.early_stopping == "never" and self.params.length_penalty > 0:
                length = self.max_tokens
            self.improvable = self.improvable and \
                self._score(best_live_logprob, length) > self.finished[-1].score
        return self.improvable


# ---- the engine's side: beams are sequences ----------------------------------------------------

def record_beam_logprobs(logits: torch.Tensor, beams: list[Sequence], fork: Callable[[Sequence], Sequence],
                         finish: Callable[[Sequence, str], None]) -> list[Request]:
    """Keep each beam's next-token log-probs (logits row i is beam i's); run the beam step of
    every request whose live beams all have theirs. Returns the requests that finished."""
    finished = []
    for row, seq in enumerate(beams):
        temperature = seq.request.beam.params.temperature
        scaled = logits[row] / temperature if temperature > 0 else logits[row]
        seq.beam_logprobs = torch.log_softmax(scaled.float(), dim=-1)
        request = seq.request
        if request.first_token_time is None:
            request.first_token_time = time.perf_counter()
        if all(b.beam_logprobs is not None for b in request.seqs):
            _beam_step(request, fork, finish)
            if request.is_finished:
                finished.append(request)
    return finished


def _beam_step(request: Request, fork: Callable[[Sequence], Sequence],
               finish: Callable[[Sequence, str], None]) -> None:
    beams = request.seqs
    continuations = request.beam.step([b.cumulative_logprob for b in beams],
                                      [b.output_token_ids for b in beams],
                                      torch.stack([b.beam_logprobs for b in beams]))
    for b in beams:
        b.beam_logprobs = None
    extended = {c.beam for c in continuations}
    for i, b in enumerate(beams):
        if i not in extended:
            finish(b, "length")  # dropped beam: frees its blocks (shared ones stay)
    request.seqs, request.forked = [], True
    placed: set[int] = set()
    continued = []
    for c in continuations:  # fork before any token is appended to the parent
        parent = beams[c.beam]
        if c.beam in placed:
            child = fork(parent)
        else:
            placed.add(c.beam)
            child = parent
            child.index = len(request.seqs)
            request.seqs.append(child)
        continued.append((child, c))
    for child, c in continued:
        child.token_ids.append(c.token)
        child.cumulative_logprob = c.cum_logprob
    if request.beam.done:
        request.seqs = beams


def beam_output(request: Request, tokenizer) -> RequestOutput:
    """The finished hypotheses, best first, as completions (`cumulative_logprob` is the
    hypothesis' log-probability; they are ranked by their length-penalised score)."""
    completions = []
    for index, hyp in enumerate(request.beam.finished):
        text = tokenizer.decode(hyp.token_ids) if tokenizer is not None else ""
        ends_with_eos = hyp.token_ids[-1] in request.beam.eos_token_ids
        completions.append(CompletionOutput(
            index=index, text=text, token_ids=list(hyp.token_ids), finish_reason="stop" if ends_with_eos
            else "length", cumulative_logprob=hyp.cum_logprob, delta_text=text,
            delta_token_ids=list(hyp.token_ids)))
    metrics = RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time,
                             len(request.prompt_token_ids), max((len(c.token_ids) for c in completions), default=0))
    return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                         request.is_finished, metrics)
