"""Quality report: perplexity of a model over a token stream and, against a reference model,
the KL divergence of their token distributions and their top-1 agreement.

Windows and scoring follow llama.cpp's perplexity tool (tools/perplexity/perplexity.cpp), so the
numbers are comparable with `llama-perplexity` on the same tokens: the tokens (tokenized with
the model's special tokens, so with a leading BOS where the model adds one) are cut into
`len // ctx` non-overlapping windows of `ctx` tokens, the rest is dropped; where the model adds a
BOS, each window's first token is replaced by BOS; only the second half of each window is scored:
the logits at positions `ctx // 2 .. ctx - 2` predict the tokens that follow them, so every
scored token has at least `ctx // 2` tokens of context.

A model is anything that maps a window's token ids to fp32 logits [len(window), vocab]; an
engine's `LLMEngine.score` is one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from lmserve.errors import InvalidParameterError

Scorer = Callable[[list[int]], torch.Tensor]


@dataclass
class QualityReport:
    ctx: int
    num_windows: int
    num_scored: int  # positions scored over all windows
    perplexity: float
    perplexity_stderr: float  # llama.cpp's "+/-": standard error of the mean NLL, times the perplexity
    reference_perplexity: float | None = None
    mean_kl: float | None = None  # mean over scored positions of KL(reference || model), nats
    top1_agreement: float | None = None  # fraction of scored positions whose argmaxes agree

    def to_dict(self) -> dict:
        return asdict(self)


def perplexity_windows(token_ids: list[int], ctx: int, bos_token_id: int | None = None,
                       max_windows: int | None = None) -> list[list[int]]:
    """The non-overlapping windows of `ctx` tokens that llama.cpp scores, each starting with
    `bos_token_id` when one is given (the model adds a BOS)."""
    if not isinstance(ctx, int) or ctx < 3:
        raise InvalidParameterError("ctx", f"must be an integer >= 3 (half of each window is scored), got {ctx!r}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise InvalidParameterError("max_windows", f"must be an integer >= 1, got {max_windows!r}")
    count = len(token_ids) // ctx
    if count == 0:
        raise InvalidParameterError("ctx", f"the text has only {len(token_ids)} tokens, fewer than one window "
                                           f"of {ctx}; use a longer text or a smaller ctx")
    if max_windows is not None:
        count = min(count, max_windows)
    windows = [list(token_ids[i * ctx: (i + 1) * ctx]) for i in range(count)]
    if bos_token_id is not None:
        for window in windows:
            window[0] = bos_token_id
    return windows


def quality_report(model: Scorer, windows: list[list[int]], reference: Scorer | None = None) -> QualityReport:
    """Score `windows` (from :func:`perplexity_windows`) with `model`, and with `reference` too
    when given; the targets are the windows' own tokens."""
    ctx = len(windows[0])
    first = ctx // 2
    nll_sum = nll_sq_sum = ref_nll_sum = kl_sum = 0.0
    agree = 0
    count = 0
    for window in windows:
        if len(window) != ctx:
            raise InvalidParameterError("windows", f"all windows must have {ctx} tokens, got one of {len(window)}")
        targets = torch.tensor(window[first + 1:])
        logprobs = _scored_logprobs(model, window, first)
        nll = -logprobs.gather(1, targets[:, None])[:, 0].double()
        nll_sum += nll.sum().item()
        nll_sq_sum += (nll * nll).sum().item()
        count += len(targets)
        if reference is not None:
            ref_logprobs = _scored_logprobs(reference, window, first)
            if ref_logprobs.shape != logprobs.shape:
                raise InvalidParameterError("reference", f"vocabulary of {ref_logprobs.shape[1]} tokens differs "
                                                         f"from the model's {logprobs.shape[1]}")
            ref_nll_sum -= ref_logprobs.gather(1, targets[:, None]).double().sum().item()
            kl = (ref_logprobs.exp() * (ref_logprobs - logprobs)).sum(-1)
            kl_sum += kl.double().sum().item()
            agree += int((ref_logprobs.argmax(-1) == logprobs.argmax(-1)).sum())
    mean_nll = nll_sum / count
    variance = max(nll_sq_sum / count - mean_nll * mean_nll, 0.0)
    perplexity = math.exp(mean_nll)
    stderr = math.sqrt(variance / (count - 1)) * perplexity if count > 1 else float("nan")
    report = QualityReport(ctx, len(windows), count, perplexity, stderr)
    if reference is not None:
        report.reference_perplexity = math.exp(ref_nll_sum / count)
        report.mean_kl = kl_sum / count
        report.top1_agreement = agree / count
    return report


def _scored_logprobs(scorer: Scorer, window: list[int], first: int) -> torch.Tensor:
    logits = scorer(window)
    if logits.shape[0] != len(window):
        raise InvalidParameterError("scorer", f"returned logits for {logits.shape[0]} positions, "
                                              f"expected {len(window)}")
    return torch.log_softmax(logits[first: len(window) - 1].float(), dim=-1)


def text_windows(tokenizer, text: str, ctx: int, max_windows: int | None = None) -> list[list[int]]:
    """Tokenize `text` as llama.cpp's perplexity tool does (with the model's special tokens) and
    cut it into scoring windows, each led by BOS when the tokenizer adds one."""
    if tokenizer is None:
        raise InvalidParameterError("model", "has no tokenizer, so it cannot score text")
    bos = tokenizer.bos_token_id
    adds_bos = bos is not None and tokenizer.encode("a")[:1] == [bos]
    return perplexity_windows(tokenizer.encode(text), ctx, bos if adds_bos else None, max_windows)
