"""Per-request state: a `Request` owns one or more `Sequence`s (n / best_of samples or the live
beams of one prompt). A request starts with one sequence; the others are forked from it once its
prompt is computed, sharing its KV blocks copy-on-write."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from lmserve.sampling_params import SamplingParams


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    SWAPPED = "swapped"  # preempted with its KV copied to the swap tier; waits to be swapped back in
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One token stream: the prompt, its generated tokens and where its KV lives."""

    seq_id: int
    request: "Request"
    index: int  # which of the request's n samples
    token_ids: list[int]  # prompt followed by generated tokens
    num_prompt_tokens: int
    generator: torch.Generator | None
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)  # NO_BLOCK where a block was dropped or swapped out
    swap_table: list[int] = field(default_factory=list)  # while swapped: swap-tier block per table entry
    block_hashes: list[int] = field(default_factory=list)  # chained hashes of the full blocks' tokens
    num_registered_blocks: int = 0  # leading blocks already entered into the prefix cache
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    text: str = ""
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] = field(default_factory=list)
    detokenizer: object | None = None
    stop_matcher: object | None = None
    num_emitted_tokens: int = 0  # output tokens already reported in a streaming delta
    num_emitted_chars: int = 0
    beam_logprobs: object | None = None  # beam search: next-token log-probs awaiting the request's beam step
    spec_token_ids: list[int] = field(default_factory=list)  # proposed tokens the next step verifies
    spec_draft_probs: torch.Tensor | None = None  # [k, V] the draft's q for each proposal (sampled drafts)
    grammar: object | None = None  # structured_output.GrammarMatcher of a constrained request
    xray: list[dict] | None = None  # X-ray token records (requests with params.xray only; engine/xray.py)
    num_emitted_xray: int = 0

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    @property
    def awaits_beam_step(self) -> bool:
        """A beam whose next-token log-probs are known: nothing to compute until its siblings'
        are too and the beam step extends it."""
        return self.beam_logprobs is not None


@dataclass(eq=False)
class Request:
    """A user request: a prompt, its sampling parameters and timing metrics."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.perf_counter)
    first_token_time: float | None = None
    finished_time: float | None = None
    seqs: list[Sequence] = field(default_factory=list)  # samples, or the live beams under beam search
    width: int = 1  # sequences the request grows to: best_of (or n), or the beam width
    forked: bool = False  # whether the first sequence has been forked into `width`
    beam: object | None = None  # beam_search.BeamSearch state of a beam-search request
    grammar: object | None = None  # a fresh GrammarMatcher of its constraint; each sequence copies it
    xray: dict | None = None  # X-ray request record (params.xray only): prefix-cache hit, prefill steps
    lora: object | None = None  # the lora.adapter.LoRAAdapter it runs with (None: the base model)

    @property
    def cache_salt(self) -> str:
        """What sets this request's K/V apart from another's with the same tokens (its adapter)."""
        return self.lora.cache_salt if self.lora is not None else ""

    @property
    def pending_forks(self) -> int:
        """Sequences this request will add once its prompt is computed."""
        return 0 if self.forked else self.width - 1

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)
