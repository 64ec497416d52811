"""Token sampling: turns a batch of next-token logits into one token per row.

Each row carries its own `SamplingParams`. The stages run in a fixed order, vectorised over the
batch, and a stage is skipped entirely when no row in the batch uses it:

    logit_bias -> repetition penalty -> frequency/presence penalties -> min_tokens masking
    -> structured-output token masks
    -> greedy rows: argmax
    -> other rows: temperature -> top-k -> top-p -> min-p -> exponential-race sample

Random numbers for a row come only from that row's `torch.Generator`, so a seeded request
yields the same tokens whatever else shares its batch. Reported logprobs are always those of
the model's raw distribution (log-softmax of the unprocessed logits).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch

from lmserve.engine.structured_output import forbidden_tokens
from lmserve.quant import native
from lmserve.sampling_params import SamplingParams


@dataclass
class SamplingRow:
    """What the sampler needs to know about one sequence in the batch."""

    params: SamplingParams
    generator: torch.Generator | None  # per-request RNG; None only when greedy
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    token_mask: torch.Tensor | None = None  # [ceil(V / 32)] int32 bits of the allowed tokens (constrained rows)


@dataclass
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[float]  # raw-distribution logprob of each sampled token
    top_logprobs: list[list[tuple[int, float]] | None]  # top-n (token, logprob) when params.logprobs is set


class Sampler:
    """Samples one token per row of `logits` ([B, V] float32) under per-row parameters."""

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow],
                 stop_token_ids_per_row: list[set[int]] | None = None) -> SamplerOutput:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(f"expected logits of shape [{len(rows)}, vocab], got {tuple(logits.shape)}")
        if not rows:
            return SamplerOutput([], [], [])
        logits = logits.float()
        raw_argmax, log_norm = _argmax_logsumexp(logits)
        processed = apply_penalties(logits, rows, stop_token_ids_per_row)
        token_ids = _choose_tokens(processed, rows, raw_argmax if processed is logits else None)
        return _gather_output(logits, token_ids, rows, log_norm)


def probabilities(logits: torch.Tensor, rows: list[SamplingRow],
                  stop_token_ids_per_row: list[set[int]] | None = None) -> torch.Tensor:
    """The distributions the sampler draws from for (non-greedy) `rows`: penalties, masks and
    filters applied, softmax. [B, V] float32."""
    processed = apply_penalties(logits.float(), rows, stop_token_ids_per_row)
    return torch.softmax(apply_filters(processed, [r.params for r in rows]), dim=-1)


# ---- penalties (all rows, greedy included) -------------------------------------------------------

def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow],
                    stop_token_ids_per_row: list[set[int]] | None = None) -> torch.Tensor:
    """Apply logit_bias, repetition, frequency/presence penalties, min_tokens masking and the
    structured-output token masks.

    Returns a new tensor when any of them applies (the input is left untouched, since logprobs
    are reported from it), else the input itself. Token ids outside the vocabulary are ignored.
    """
    params = [r.params for r in rows]
    bias = any(p.logit_bias for p in params)
    repetition = any(p.repetition_penalty != 1.0 for p in params)
    frequency = any(p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 for p in params)
    mask_stops = any(len(r.output_token_ids) < r.params.min_tokens for r in rows)
    constrained = [i for i, r in enumerate(rows) if r.token_mask is not None]
    if not (bias or repetition or frequency or mask_stops or constrained):
        return logits
    out = logits.clone()
    if bias:
        _add_logit_bias(out, params)
    if repetition:
        _repetition_penalty(out, rows)
    if frequency:
        _frequency_presence_penalty(out, rows)
    if mask_stops:
        _mask_stop_tokens(out, rows, stop_token_ids_per_row)
    if constrained:
        _apply_token_masks(out, constrained, [rows[i].token_mask for i in constrained])
    return out


def _pad_rows(rows: list[list], empty) -> list[list]:
    """Pad lists to a common width by repeating each one's first item (`empty` for an empty list).

    Repeating a real (id, value) entry keeps a scatter exact: the copy writes the same value to
    the same slot. `empty` must be a no-op entry (token 0 with a neutral value).
    """
    width = max(1, max(len(r) for r in rows))
    return [r + [r[0] if r else empty] * (width - len(r)) for r in rows]


def _update_at(logits: torch.Tensor, ids: list[list[int]], values, neutral: float, combine) -> None:
    """Set logits[b, ids[b][j]] = combine(logits[b, ids[b][j]], values[b][j]) for every row b.

    Only the named positions are read and written (gather/scatter), so the cost follows the number
    of ids rather than the vocabulary. `ids` must be unique and in the vocabulary within a row;
    `values` is a per-row list aligned with `ids`, or one number per row; `neutral` is a value
    that `combine` leaves unchanged.
    """
    # Via numpy: building a tensor from nested lists is ~8x slower, and prompts can be long.
    id_tensor = torch.from_numpy(np.array(_pad_rows(ids, 0), dtype=np.int64)).to(logits.device)
    if isinstance(values[0], list):
        values = _pad_rows(values, neutral)
    else:  # one value per row: rows with no ids pad with token 0, which must stay unchanged
        values = [[v] if row else [neutral] for v, row in zip(values, ids)]
    value_tensor = torch.from_numpy(np.array(values, dtype=np.float32)).to(logits.device, logits.dtype)
    logits.scatter_(1, id_tensor, combine(logits.gather(1, id_tensor), value_tensor))


def _in_vocab(ids, vocab: int) -> list[int]:
    ids = list(ids)
    if ids and (min(ids) < 0 or max(ids) >= vocab):
        return [t for t in ids if 0 <= t < vocab]
    return ids


def _add(current: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return current + values


def _column(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).unsqueeze(1)


def _add_logit_bias(logits: torch.Tensor, params: list[SamplingParams]) -> None:
    vocab = logits.shape[1]
    biases = [{t: v for t, v in (p.logit_bias or {}).items() if t < vocab} for p in params]
    _update_at(logits, [list(b) for b in biases], [list(b.values()) for b in biases], 0.0, _add)


def _repetition_penalty(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """HF style: a seen token's logit is divided by the penalty if positive, multiplied if not."""
    vocab = logits.shape[1]
    seen = [_in_vocab(set(r.prompt_token_ids).union(r.output_token_ids), vocab)
            if r.params.repetition_penalty != 1.0 else [] for r in rows]
    _update_at(logits, seen, [r.params.repetition_penalty for r in rows], 1.0,
               lambda current, penalty: torch.where(current > 0, current / penalty, current * penalty))


def _frequency_presence_penalty(logits: torch.Tensor, rows: list[SamplingRow]) -> None:
    """OpenAI style over generated tokens: logit -= count * frequency + (count > 0) * presence."""
    vocab = logits.shape[1]
    ids, deltas = [], []
    for r in rows:
        frequency, presence = r.params.frequency_penalty, r.params.presence_penalty
        counts = Counter(r.output_token_ids) if frequency != 0.0 or presence != 0.0 else {}
        row_ids = _in_vocab(counts, vocab)
        ids.append(row_ids)
        deltas.append([-(counts[t] * frequency + presence) for t in row_ids])
    _update_at(logits, ids, deltas, 0.0, _add)


def _mask_stop_tokens(logits: torch.Tensor, rows: list[SamplingRow],
                      stop_token_ids_per_row: list[set[int]] | None) -> None:
    """Forbid stop/eos tokens for rows that have not yet produced min_tokens tokens."""
    vocab = logits.shape[1]
    ids = []
    for i, r in enumerate(rows):
        if len(r.output_token_ids) >= r.params.min_tokens:
            ids.append([])
            continue
        extra = stop_token_ids_per_row[i] if stop_token_ids_per_row is not None else ()
        ids.append(_in_vocab(set(extra).union(r.params.stop_token_ids or ()), vocab))
    _update_at(logits, ids, [float("-inf")] * len(rows), 0.0, _add)


def _apply_token_masks(logits: torch.Tensor, row_ids: list[int], masks: list[torch.Tensor]) -> None:
    """Send the tokens a row's bitmask forbids to -inf."""
    forbidden = forbidden_tokens(torch.stack(masks).to(logits.device), logits.shape[1])
    if len(row_ids) == logits.shape[0]:  # every row constrained: in place, no gather / scatter
        logits.masked_fill_(forbidden, float("-inf"))
        return
    index = torch.tensor(row_ids, device=logits.device)
    logits[index] = logits[index].masked_fill(forbidden, float("-inf"))


# ---- filters (non-greedy rows only) --------------------------------------------------------------

def apply_filters(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Apply temperature, top-k, top-p and min-p (in that order); removed tokens get -inf.

    All rows are treated as sampled rows (the caller leaves greedy rows out). Returns a new tensor.
    """
    vocab = logits.shape[1]
    temperatures = [1.0 if p.greedy else p.temperature for p in params]
    out = logits / _column(temperatures, logits) if any(t != 1.0 for t in temperatures) else logits.clone()
    use_top_k = any(1 <= p.top_k < vocab for p in params)
    use_top_p = any(p.top_p < 1.0 for p in params)
    if use_top_k or use_top_p:
        out = _top_k_top_p(out, params, use_top_k, use_top_p)
    if any(p.min_p > 0.0 for p in params):
        probs = torch.softmax(out, dim=-1)
        threshold = _column([p.min_p for p in params], probs) * probs.amax(dim=-1, keepdim=True)
        out.masked_fill_(probs < threshold, float("-inf"))
    return out


def _top_k_top_p(logits: torch.Tensor, params: list[SamplingParams], use_top_k: bool,
                 use_top_p: bool) -> torch.Tensor:
    vocab = logits.shape[1]
    ks = [p.top_k if 1 <= p.top_k < vocab else vocab for p in params]
    if max(ks) < vocab:
        # Every row keeps at most max(ks) tokens: a partial top-k is far cheaper than a full sort.
        candidates, order = logits.topk(max(ks), dim=-1)
        out = torch.full_like(logits, float("-inf"))
    else:
        candidates, order = logits.sort(dim=-1, descending=True)
        out = torch.empty_like(logits)
    if use_top_k:
        rank = torch.arange(candidates.shape[1], device=logits.device)
        k = torch.tensor(ks, device=logits.device)
        candidates.masked_fill_(rank.unsqueeze(0) >= k.unsqueeze(1), float("-inf"))
    if use_top_p:
        probs = torch.softmax(candidates, dim=-1)
        # Keep the smallest prefix reaching top_p: a token stays if the mass before it is < top_p.
        mass_before = torch.cumsum(probs, dim=-1) - probs
        mass_before[:, 0] = 0.0  # the most likely token always stays
        top_p = _column([p.top_p for p in params], probs)
        candidates.masked_fill_(mass_before >= top_p, float("-inf"))
    return out.scatter_(1, order, candidates)


# ---- choosing and reporting ----------------------------------------------------------------------

def _argmax_logsumexp(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's argmax and log-sum-exp: one native pass on the CPU (PyTorch's two ops cost
    ~2 ms per 16 rows of a 49k vocabulary), PyTorch elsewhere."""
    ext = native.load() if logits.device.type == "cpu" else None
    if ext is not None:
        return ext.argmax_logsumexp(logits)
    return logits.argmax(dim=-1), torch.logsumexp(logits, dim=-1)


def _choose_tokens(processed: torch.Tensor, rows: list[SamplingRow],
                   argmax: torch.Tensor | None = None) -> torch.Tensor:
    """Argmax for greedy rows (`argmax`, when already computed), a filtered random draw for the
    others; [B] int64 on the device."""
    sampled_rows = [i for i, r in enumerate(rows) if not r.params.greedy]
    if not sampled_rows:
        return argmax if argmax is not None else processed.argmax(dim=-1)
    if len(sampled_rows) == len(rows):
        subset = processed
    else:
        subset = processed[torch.tensor(sampled_rows, device=processed.device)]
    filtered = apply_filters(subset, [rows[i].params for i in sampled_rows])
    drawn = _exponential_race(filtered, [rows[i].generator for i in sampled_rows])
    if len(sampled_rows) == len(rows):
        return drawn
    token_ids = argmax.clone() if argmax is not None else processed.argmax(dim=-1)
    token_ids[torch.tensor(sampled_rows, device=processed.device)] = drawn
    return token_ids


def _exponential_race(logits: torch.Tensor, generators: list[torch.Generator | None]) -> torch.Tensor:
    """Sample each row from softmax(logits): argmax of logits - log(E) with E ~ Exp(1) per token.

    (argmax p_i / E_i picks token i with probability p_i.) Each row draws its V uniforms from its
    own generator only, so its result does not depend on the rest of the batch. Tokens at -inf
    (probability 0) can never win because E is clamped to a finite positive range, keeping
    -log(E) finite even if a backend's uniform_ returns exactly 0 or 1.
    """
    uniform = torch.empty_like(logits)
    for i, generator in enumerate(generators):
        if generator is None:
            raise ValueError("a non-greedy sampling row needs a torch.Generator")
        if generator.device == uniform.device:
            uniform[i].uniform_(generator=generator)
        else:
            uniform[i].copy_(torch.rand(uniform.shape[1], device=generator.device, generator=generator))
    # E = -log(1 - U), computed in place (uniform_ and the exponential_ kernel differ ~5x in speed on CPU).
    finfo = torch.finfo(uniform.dtype)
    exponential = uniform.neg_().log1p_().neg_().clamp_(min=finfo.tiny, max=finfo.max)
    return (logits - exponential.log_()).argmax(dim=-1)


def _gather_output(raw: torch.Tensor, token_ids: torch.Tensor, rows: list[SamplingRow],
                   log_norm: torch.Tensor) -> SamplerOutput:
    """Raw-distribution logprobs of the chosen tokens (and top-n), fetched in one host transfer;
    `log_norm` [B] is each row's log-sum-exp."""
    log_norm = log_norm.unsqueeze(1)
    chosen = raw.gather(1, token_ids.unsqueeze(1)) - log_norm
    parts = [token_ids.unsqueeze(1).double(), chosen.double()]
    top_n = max((r.params.logprobs for r in rows if r.params.logprobs), default=0)
    if top_n:
        top_values, top_ids = raw.topk(min(top_n, raw.shape[1]), dim=-1)
        parts += [top_ids.double(), (top_values - log_norm).double()]
    # float64 holds token ids exactly, so ids and values travel together in one transfer.
    host = torch.cat(parts, dim=1).cpu().tolist()
    top_logprobs = []
    for row, values in zip(rows, host):
        n = row.params.logprobs
        if n is None:
            top_logprobs.append(None)
            continue
        width = (len(values) - 2) // 2
        top_logprobs.append([(int(values[2 + j]), values[2 + width + j]) for j in range(min(n, width))])
    return SamplerOutput(token_ids=[int(v[0]) for v in host], logprobs=[v[1] for v in host],
                         top_logprobs=top_logprobs)
