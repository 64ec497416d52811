"""Tokens out: each sampled token appended to its sequence, turned into text, checked against
the stop conditions (stop token ids, EOS, stop strings across token boundaries, max_tokens, the
context limit, a completed constraint), and requests reported as `RequestOutput`s with their new text since the last
report. A finished sequence leaves the scheduler (and frees its KV blocks) at once."""

from __future__ import annotations

import logging
from collections.abc import Callable

from lmserve.engine.beam_search import beam_output
from lmserve.engine.sequence import Request, Sequence, SequenceStatus
from lmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput

logger = logging.getLogger("lmserve")


class OutputProcessor:
    def __init__(self, tokenizer, stop_token_ids: frozenset[int], max_model_len: int,
                 release: Callable[[Sequence], None]):
        self.tokenizer = tokenizer
        self.stop_token_ids = stop_token_ids
        self.max_model_len = max_model_len
        self.release = release  # takes a finished sequence out of the scheduler

    def append_token(self, seq: Sequence, token: int, logprob: float, top: list[tuple[int, float]] | None) -> None:
        if seq.grammar is not None and token not in self.stop_token_ids and not seq.grammar.accept(token):
            # Only when the mask allowed nothing (e.g. min_tokens forbids the end the constraint needs).
            logger.warning("request %s: token %d is outside its constraint; finishing it",
                           seq.request.request_id, token)
            self.finish(seq, "stop", flush=True)
            return
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        params = seq.params
        if params.logprobs is not None:
            entry = dict(top or [])
            entry[token] = logprob
            seq.logprobs.append(entry)
        if token in (params.stop_token_ids or ()):
            self.finish(seq, "stop", stop_reason=token)
            return
        if token in self.stop_token_ids and not params.ignore_eos:
            self.finish(seq, "stop")
            return
        if seq.detokenizer is not None and self._add_text(seq, token):
            return
        if seq.grammar is not None and seq.grammar.is_terminated():
            self.finish(seq, "stop", flush=True)  # the constraint is complete: nothing may follow
            return
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            self.finish(seq, "length")

    def _add_text(self, seq: Sequence, token: int) -> bool:
        """Append the token's text; True when a stop string ended the sequence."""
        delta = seq.detokenizer.add(token)
        if seq.stop_matcher is None:
            seq.text += delta
            return False
        delta, stopped = seq.stop_matcher.feed(delta)
        seq.text += delta
        if stopped:
            if seq.params.include_stop_str_in_output:
                seq.text += seq.stop_matcher.matched
            self.finish(seq, "stop", stop_reason=seq.stop_matcher.matched)
        return stopped

    def finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None, flush: bool = False) -> None:
        """End the sequence; text held back is released unless a stop token or string ended it
        (`flush` releases it for other stops)."""
        if (reason != "stop" or flush) and seq.detokenizer is not None:
            # Release text held back for an unfinished character or a possible stop string.
            tail = seq.detokenizer.flush()
            if seq.stop_matcher is not None:
                tail = seq.stop_matcher.feed(tail)[0] + seq.stop_matcher.flush()
            seq.text += tail
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.status = SequenceStatus.FINISHED
        self.release(seq)

    def make_output(self, request: Request) -> RequestOutput | None:
        """The request's output with what is new since its last one; None while a beam-search or
        best_of request runs (those are ranked, and reported, only once finished)."""
        if request.beam is not None:
            return beam_output(request, self.tokenizer) if request.is_finished else None
        seqs = request.seqs
        if request.width > request.params.n:  # best_of: the n most likely
            if not request.is_finished:
                return None
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: request.params.n]
            for index, seq in enumerate(seqs):
                seq.index = index
        completions = [self._completion(seq) for seq in seqs]
        metrics = RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time,
                                 len(request.prompt_token_ids), max(len(s.output_token_ids) for s in request.seqs))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             request.is_finished, metrics, request.xray)

    @staticmethod
    def _completion(seq: Sequence) -> CompletionOutput:
        out_ids = seq.output_token_ids
        completion = CompletionOutput(
            index=seq.index, text=seq.text, token_ids=list(out_ids), finish_reason=seq.finish_reason,
            stop_reason=seq.stop_reason, cumulative_logprob=seq.cumulative_logprob,
            logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
            delta_text=seq.text[seq.num_emitted_chars:], delta_token_ids=out_ids[seq.num_emitted_tokens:])
        seq.num_emitted_chars = len(seq.text)
        seq.num_emitted_tokens = len(out_ids)
        if seq.xray is not None:  # X-ray requests only
            completion.xray = seq.xray[seq.num_emitted_xray:]
            seq.num_emitted_xray = len(seq.xray)
        return completion
