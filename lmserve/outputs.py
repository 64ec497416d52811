"""What generation returns: per-request results with per-sample completions and metrics."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    finish_reason: str | None  # "stop", "length", "abort" or None while running
    stop_reason: str | int | None = None  # the stop string or stop token id that ended it
    cumulative_logprob: float = 0.0
    logprobs: list[dict[int, float]] | None = None  # per token: {token id: logprob} incl. the sampled one
    delta_text: str = ""  # new since the previous output of this request (streaming)
    delta_token_ids: list[int] = field(default_factory=list)
    xray: list[dict] | None = None  # X-ray token records new since the previous output (params.xray only)

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestMetrics:
    arrival_time: float
    first_token_time: float | None
    finished_time: float | None
    num_prompt_tokens: int
    num_output_tokens: int

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def time_per_output_token(self) -> float | None:
        if self.finished_time is None or self.first_token_time is None or self.num_output_tokens < 2:
            return None
        return (self.finished_time - self.first_token_time) / (self.num_output_tokens - 1)


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    metrics: RequestMetrics
    xray: dict | None = None  # X-ray request record (params.xray only): prefix-cache hit, prefill steps


@dataclass
class BeamSequence:
    """One finished beam-search hypothesis."""

    token_ids: list[int]  # generated tokens (the prompt excluded), EOS included when it ended the beam
    text: str
    cum_logprob: float
    score: float  # cum_logprob / len(token_ids) ** length_penalty: what the hypotheses are ranked by
    finish_reason: str  # "stop" (ended with EOS) or "length"


@dataclass
class BeamSearchOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    sequences: list[BeamSequence]  # best first
