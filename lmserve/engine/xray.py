"""Inference X-ray: what the engine did for one request, recorded only for requests that ask
(`SamplingParams.xray`), and the engine's recent step composition (the timeline).

Per request (`Request.xray`): how many prompt tokens the prefix cache supplied and the steps that
computed its prompt (prefill chunks: step index, tokens, batch size, times). Per generated token
(`Sequence.xray`, one dict each): its top candidates under the model's raw distribution and under
the distribution it was drawn from (penalties, masks, temperature, top-k, top-p and min-p
applied: `sampler.apply_penalties` / `apply_filters`, recomputed here for the X-ray rows only),
the sampled token's rank in that distribution, the parameters applied, the engine step, the
batch size of that step, the KV blocks the sequence holds and the time since arrival.

Cost when off: `LLMEngine.step` tests one set (`LLMEngine.xray_requests`, the live X-ray
requests) and does nothing more while it is empty. Token ids only here; the server turns them
into text.

The timeline (`Timeline`) keeps the last `TIMELINE_STEPS` steps' composition (per step: request
ids with their prefill-chunk and decode tokens, preemptions, duration), recorded only while
someone watches: for `TIMELINE_WATCH_SECONDS` after the last `Timeline.watch()` (each
GET /v1/engine/status), nothing at all otherwise.
"""

from __future__ import annotations

import collections
import time

import torch

from lmserve.engine.sampler import SamplingRow, apply_filters, apply_penalties
from lmserve.engine.scheduler_output import SchedulerOutput

XRAY_TOP = 10  # candidates reported per token, before and after the sampling filters
TIMELINE_STEPS = 256
TIMELINE_WATCH_SECONDS = 60.0


def token_records(logits: torch.Tensor, rows: list[SamplingRow], stops: list[set[int]],
                  token_ids: list[int], indices: list[int]) -> dict[int, dict]:
    """Records for the sampler rows `indices` (of `logits` [B, V], `rows`, `stops`) whose sampled
    tokens are `token_ids` (all rows): {row index: record}."""
    index = torch.tensor(indices, device=logits.device)
    sub_logits = logits[index].float()
    raw = torch.log_softmax(sub_logits, dim=-1)
    sub_rows = [rows[i] for i in indices]
    processed = apply_penalties(sub_logits, sub_rows, [stops[i] for i in indices])
    params = [r.params for r in sub_rows]
    # Greedy rows take the argmax of the penalized distribution: the filters do not apply to them.
    filtered = apply_filters(processed, params)
    greedy = torch.tensor([p.greedy for p in params], device=logits.device).unsqueeze(1)
    filtered = torch.where(greedy, processed, filtered)
    final = torch.log_softmax(filtered, dim=-1)
    chosen = torch.tensor([token_ids[i] for i in indices], device=logits.device).unsqueeze(1)
    chosen_final = final.gather(1, chosen)
    chosen_raw = raw.gather(1, chosen)
    ranks = (final > chosen_final).sum(dim=1)
    k = min(XRAY_TOP, raw.shape[1])
    raw_values, raw_ids = raw.topk(k, dim=-1)
    final_values, final_ids = final.topk(k, dim=-1)
    kept = torch.isfinite(final).sum(dim=1)
    host = [t.cpu().tolist() for t in (raw_values, raw_ids, final_values, final_ids, ranks, kept,
                                        chosen_final.squeeze(1), chosen_raw.squeeze(1))]
    records = {}
    for j, i in enumerate(indices):
        p = params[j]
        records[i] = {
            "token_id": token_ids[i],
            "logprob": host[7][j],  # under the raw distribution
            "logprob_processed": host[6][j],  # under the distribution it was drawn from
            "rank": host[4][j],
            "kept": host[5][j],  # candidates left after the filters (the whole vocabulary when greedy)
            "top": [[t, v] for t, v in zip(host[1][j], host[0][j])],
            "top_processed": [[t, v] for t, v in zip(host[3][j], host[2][j]) if v != float("-inf")],
            "params": {"greedy": p.greedy, "temperature": p.temperature, "top_k": p.top_k, "top_p": p.top_p,
                       "min_p": p.min_p, "repetition_penalty": p.repetition_penalty,
                       "frequency_penalty": p.frequency_penalty, "presence_penalty": p.presence_penalty},
        }
    return records


def record_schedule(scheduled: SchedulerOutput, step: int, started: float) -> None:
    """Before the forward: each X-ray request's prefix-cache hit (its first scheduling) and its
    prefill chunks."""
    batch = len(scheduled.scheduled)
    for r in scheduled:
        seq = r.seq
        if not getattr(seq.params, "xray", False):
            continue
        request = seq.request
        if request.xray is None:
            request.xray = {"cached_tokens": seq.num_computed_tokens, "num_prompt_tokens": seq.num_prompt_tokens,
                            "prefill": []}
        if seq.num_computed_tokens < seq.num_prompt_tokens and seq.index == 0:
            request.xray["prefill"].append({"step": step, "tokens": r.num_tokens, "batch_size": batch,
                                            "start": started - request.arrival_time})


def finish_prefill(scheduled: SchedulerOutput, ended: float) -> None:
    """After the forward: the end time of this step's prefill chunks."""
    for r in scheduled:
        xray = r.seq.request.xray
        if xray is not None and xray["prefill"] and "end" not in xray["prefill"][-1]:
            xray["prefill"][-1]["end"] = ended - r.seq.request.arrival_time


def attach(seq, record: dict, token: int, step: int, batch_size: int, now: float) -> None:
    """Append one generated token's record to `seq` (the token actually appended, which
    speculative decoding may have changed)."""
    if seq.xray is None:
        seq.xray = []
    seq.xray.append({**record, "token_id": token, "step": step, "batch_size": batch_size,
                     "kv_blocks": len(seq.block_table), "t": now - seq.request.arrival_time})


class Timeline:
    """The last TIMELINE_STEPS steps' composition, recorded while watched (see the module doc)."""

    def __init__(self, maxlen: int = TIMELINE_STEPS):
        self.steps: collections.deque = collections.deque(maxlen=maxlen)
        self.watched_until = 0.0  # time.monotonic() deadline; 0: not recording
        self._preemptions: int | None = None  # the scheduler's count at the last recorded step

    def watch(self, seconds: float = TIMELINE_WATCH_SECONDS) -> None:
        self.watched_until = time.monotonic() + seconds

    @property
    def active(self) -> bool:
        if self.watched_until and time.monotonic() >= self.watched_until:
            self.watched_until = 0.0
            self._preemptions = None
        return bool(self.watched_until)

    def begin(self, scheduled: SchedulerOutput, step: int, num_preemptions: int) -> dict:
        """The step's composition, taken before the forward advances the sequences."""
        requests = []
        for r in scheduled:
            seq = r.seq
            decoding = r.samples and r.num_tokens == 1 + r.num_spec_tokens
            requests.append([seq.request.request_id, 0 if decoding else r.num_tokens,
                             r.num_tokens if decoding else 0])
        entry = {"step": step, "time": time.time(), "requests": requests,
                 "preemptions": 0 if self._preemptions is None else num_preemptions - self._preemptions}
        self._preemptions = num_preemptions
        return entry

    def end(self, entry: dict, started: float) -> None:
        entry["ms"] = (time.perf_counter() - started) * 1000.0
        self.steps.append(entry)

    def last(self, n: int) -> list[dict]:
        return list(self.steps)[-n:] if n > 0 else []
