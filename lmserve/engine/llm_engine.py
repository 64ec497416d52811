"""The synchronous engine core: requests in, per-step outputs out.

`add_request` validates and queues a request; each `step()` schedules a batch, runs the model
once, samples one token for every sequence that reached the end of its known tokens, updates
text and stop conditions, frees the blocks of finished sequences at once, and returns the
outputs of the requests that progressed. There are no threads or asyncio here; the server and
the `LLM` class drive `step()` in a loop.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from contextlib import contextmanager

import torch

from lmserve.config import EngineConfig, ModelConfig
from lmserve.detokenizer import IncrementalDetokenizer, StopStringMatcher
from lmserve.engine.beam_search import BeamSearch
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.model_runner import ModelRunner, num_kv_blocks_for
from lmserve.engine.sampler import Sampler, SamplingRow
from lmserve.engine.scheduler import ScheduledSequence, Scheduler
from lmserve.engine.sequence import Request, Sequence, SequenceStatus
from lmserve.errors import ContextLengthError, InvalidParameterError, ModelLoadError
from lmserve.layers.linear import Linear
from lmserve.loader import Checkpoint
from lmserve.models import MODEL_REGISTRY
from lmserve.models.weights import WeightLoadError, load_weights
from lmserve.outputs import CompletionOutput, RequestMetrics, RequestOutput
from lmserve.quant.packed import KernelOrGemmWeight
from lmserve.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("lmserve")


@contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(checkpoint: Checkpoint, engine_config: EngineConfig, max_model_len: int) -> torch.nn.Module:
    cfg = checkpoint.config
    model_cls = MODEL_REGISTRY.get(cfg.architecture)
    if model_cls is None:
        raise ModelLoadError(checkpoint.path, f"unsupported architecture {cfg.architecture!r} "
                                              f"(supported: {', '.join(MODEL_REGISTRY)})")
    with _default_dtype(engine_config.torch_dtype), torch.device(engine_config.torch_device):
        model = model_cls(cfg, max_model_len)
    # The packed kernels are PyTorch's CPU ones; on a GPU quantized files are dequantized.
    keep_packed = engine_config.quantization == "auto" and engine_config.torch_device.type == "cpu"
    try:
        load_weights(model, checkpoint.tensors(keep_packed=keep_packed), model.packed_modules,
                     model.ignored_checkpoint_suffixes)
    except WeightLoadError as exc:
        raise ModelLoadError(checkpoint.path, str(exc)) from None
    if engine_config.quantization in ("int8", "int4"):
        for module in model.modules():
            if isinstance(module, Linear):
                module.quantize_(engine_config.quantization)
    if engine_config.deterministic:
        for module in model.modules():
            if isinstance(module, KernelOrGemmWeight):
                module.kernel_max_rows = 0
    _log_weight_formats(model)
    return model.eval()


def _log_weight_formats(model: torch.nn.Module) -> None:
    kinds = Counter(type(m.packed).__name__ if getattr(m, "packed", None) is not None else "dense"
                    for m in model.modules() if hasattr(m, "accepts_packed"))
    weight_bytes = sum(t.numel() * t.element_size() for t in itertools.chain(model.parameters(), model.buffers()))
    logger.info("weights: %s; %.1f MiB resident", ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())),
                weight_bytes / 2**20)


def common_sliding_window(model: torch.nn.Module) -> int | None:
    """The attention window shared by every layer, or None when any layer attends globally
    (then no block may ever be released early)."""
    windows = {layer.sliding_window for layer in model.attention_layers()}
    return windows.pop() if len(windows) == 1 else None


def num_swap_blocks_for(model_config: ModelConfig, engine_config: EngineConfig) -> int:
    """Blocks of the swap tier (0 unless preemption_mode is "swap")."""
    if engine_config.preemption_mode != "swap":
        return 0
    per_block = model_config.kv_bytes_per_token(engine_config.kv_torch_dtype,
                                                engine_config.kv_quantized) * engine_config.block_size
    return engine_config.swap_space_bytes // per_block


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, engine_config: EngineConfig):
        self.checkpoint = checkpoint
        self.config = engine_config
        self.model_config = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        num_blocks = num_kv_blocks_for(self.model_config, engine_config)
        capacity = num_blocks * engine_config.block_size
        max_len = min(self.model_config.max_position_embeddings, engine_config.max_model_len or 1 << 62)
        if max_len > capacity:
            logger.warning("max_model_len lowered from %d to the KV cache capacity of %d tokens", max_len, capacity)
            max_len = capacity
        self.max_model_len = max_len
        start = time.perf_counter()
        self.model = build_model(checkpoint, engine_config, max_len)
        logger.info("loaded %s (%s) in %.1f s", checkpoint.path, self.model_config.architecture,
                    time.perf_counter() - start)
        salt = f"{checkpoint.path}|{engine_config.torch_dtype}|{engine_config.kv_cache_dtype}"  # what changes K/V
        num_swap_blocks = num_swap_blocks_for(self.model_config, engine_config)
        self.block_manager = BlockManager(num_blocks, engine_config.block_size,
                                          engine_config.enable_prefix_caching, salt, num_swap_blocks,
                                          common_sliding_window(self.model))
        self.scheduler = Scheduler(self.block_manager, engine_config.max_num_seqs,
                                   engine_config.max_num_batched_tokens, engine_config.preemption_mode)
        self.runner = ModelRunner(self.model, self.model_config, engine_config, num_blocks)
        if num_swap_blocks:
            self.runner.allocate_swap_space(num_swap_blocks)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        self._seq_ids = itertools.count()
        self._request_ids = itertools.count()
        self._seed_source = torch.Generator().manual_seed(engine_config.seed)
        if self.tokenizer is not None:
            self.stop_token_ids = frozenset(self.tokenizer.stop_token_ids)
        else:
            self.stop_token_ids = frozenset(self.model_config.eos_token_ids)

    # ---- requests -------------------------------------------------------------------------

    def _prompt_ids(self, prompt: str | list[int]) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidParameterError("prompt", "this model has no tokenizer; pass token ids instead of text")
            ids = self.tokenizer.encode(prompt)
            text = prompt
        elif isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool)
                                                       for t in prompt):
            ids, text = list(prompt), None
            bad = [t for t in ids if not 0 <= t < self.model_config.vocab_size]
            if bad:
                raise InvalidParameterError(
                    "prompt", f"token id {bad[0]} is outside the vocabulary [0, {self.model_config.vocab_size})")
        else:
            raise InvalidParameterError("prompt", "must be a string or a list of integer token ids")
        if not ids:
            raise InvalidParameterError("prompt", "must not be empty")
        return text, ids

    def add_request(self, prompt: str | list[int], params: SamplingParams | BeamSearchParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt; with `BeamSearchParams` it is decoded by beam search, and its output
        (reported once, when finished) holds the best hypotheses, best first."""
        beam_params = params if isinstance(params, BeamSearchParams) else None
        if beam_params is not None:
            params = SamplingParams(max_tokens=beam_params.max_tokens, temperature=0,
                                    ignore_eos=beam_params.ignore_eos)
        params = params or SamplingParams()
        self._check_token_ids(params)
        width = beam_params.beam_width if beam_params is not None else params.num_samples
        if width > self.config.max_num_seqs:
            raise InvalidParameterError("best_of" if beam_params is None else "beam_width",
                                        f"{width} sequences exceed max_num_seqs ({self.config.max_num_seqs})")
        text, ids = self._prompt_ids(prompt)
        if params.truncate_prompt_tokens is not None:
            ids = ids[-params.truncate_prompt_tokens:]
        limit = self.max_model_len
        max_tokens = params.max_tokens if params.max_tokens is not None else max(1, limit - len(ids))
        if len(ids) + max_tokens > limit:
            raise ContextLengthError(
                "max_tokens" if len(ids) < limit else "prompt",
                f"the prompt has {len(ids)} tokens and max_tokens is {max_tokens}: {len(ids) + max_tokens} "
                f"exceeds the context limit of {limit} tokens (set truncate_prompt_tokens to keep only "
                f"the end of the prompt)")
        request_id = request_id if request_id is not None else str(next(self._request_ids))
        if request_id in self.requests:
            raise InvalidParameterError("request_id", f"{request_id!r} is already in use")
        request = Request(request_id, text, ids, params, width=width)
        if beam_params is not None:
            request.beam = BeamSearch(beam_params, self.stop_token_ids, max_tokens)
        # One sequence computes the prompt; the other samples or beams fork from it (step()).
        self.scheduler.add(self._new_sequence(request, list(ids)))
        self.requests[request_id] = request
        return request_id

    def _new_sequence(self, request: Request, token_ids: list[int]) -> Sequence:
        params, index = request.params, len(request.seqs)
        seq = Sequence(next(self._seq_ids), request, index, token_ids, len(request.prompt_token_ids),
                       generator=None if params.greedy else self._generator(params.seed, index))
        if self.tokenizer is not None and request.beam is None:  # beams are decoded once, at the end
            seq.detokenizer = IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids,
                                                     params.skip_special_tokens)
        if params.stop:
            seq.stop_matcher = StopStringMatcher(params.stop)
        request.seqs.append(seq)
        return seq

    def _check_token_ids(self, params: SamplingParams) -> None:
        vocab = self.model_config.vocab_size
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", params.logit_bias or {})):
            bad = [t for t in ids if t >= vocab]
            if bad:
                raise InvalidParameterError(name, f"token id {bad[0]} is outside the vocabulary [0, {vocab})")

    def _generator(self, seed: int | None, index: int) -> torch.Generator:
        if seed is None:
            seed = int(torch.randint(0, 2**62, (1,), generator=self._seed_source))
        else:
            seed = (seed + index * 1_000_003) % (1 << 63)  # n samples of one seeded request must differ
        return torch.Generator(device=self.config.torch_device).manual_seed(seed)

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self._finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- scoring ------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [len(token_ids), vocab] at every position of one sequence (the logits at
        position i predict token i + 1), for perplexity and divergence reports.

        The tokens are prefilled as one temporary sequence in chunks of at most
        max_num_batched_tokens, through the same runner as generation; its KV blocks are freed
        afterwards and never enter the prefix cache."""
        _, ids = self._prompt_ids(list(token_ids))
        if len(ids) > self.max_model_len:
            raise ContextLengthError("token_ids", f"{len(ids)} tokens exceed the context limit of "
                                                  f"{self.max_model_len} tokens")
        request = Request(f"score-{next(self._request_ids)}", None, ids, SamplingParams(max_tokens=1))
        seq = Sequence(next(self._seq_ids), request, 0, list(ids), len(ids), generator=None)
        if not self.block_manager.allocate(seq, len(ids)):
            raise InvalidParameterError(
                "token_ids", f"{len(ids)} tokens need {self.block_manager.blocks_for(len(ids))} KV blocks but "
                             f"only {self.block_manager.num_free_blocks} are free")
        # The runner returns logits of sampling positions only; take the final hidden states of
        # every position from the model's output instead.
        hidden: list[torch.Tensor] = []
        hook = self.model.register_forward_hook(lambda module, args, output: hidden.append(output))
        try:
            budget = self.config.max_num_batched_tokens
            while seq.num_computed_tokens < len(ids):
                chunk = min(budget, len(ids) - seq.num_computed_tokens)
                self.runner.execute([ScheduledSequence(seq, chunk)], self.block_manager)
                seq.num_computed_tokens += chunk
            return torch.cat([self.model.compute_logits(h) for h in hidden]).float()
        finally:
            hook.remove()
            self.block_manager.free(seq)

    # ---- one iteration ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        for method, pairs in self.block_manager.take_block_ops():  # copy-on-write and swaps, in order
            getattr(self.runner, method)(pairs)
        if not scheduled:
            return []
        logits = self.runner.execute(scheduled, self.block_manager)
        for r in scheduled:
            r.seq.num_computed_tokens += r.num_tokens
            self.block_manager.register_full_blocks(r.seq)
        sampling = [r.seq for r in scheduled if r.seq.num_computed_tokens == r.seq.num_tokens]
        now = time.perf_counter()
        touched: dict[str, Request] = {}
        beam_rows = [i for i, s in enumerate(sampling) if s.request.beam is not None]
        if beam_rows:
            for request in self._record_beam_logprobs(logits[beam_rows], [sampling[i] for i in beam_rows]):
                touched[request.request_id] = request
            keep = [i for i, s in enumerate(sampling) if s.request.beam is None]
            logits, sampling = logits[keep], [sampling[i] for i in keep]
        rows_of_samples = self._fork_samples(sampling)
        if len(rows_of_samples) != logits.shape[0]:
            logits = logits[rows_of_samples]
        rows = [SamplingRow(s.params, s.generator, s.request.prompt_token_ids, s.output_token_ids)
                for s in sampling]
        result = self.sampler(logits, rows, [self.stop_token_ids | set(s.params.stop_token_ids or ())
                                             for s in sampling])
        for i, seq in enumerate(sampling):
            self._append_token(seq, result.token_ids[i], result.logprobs[i], result.top_logprobs[i])
            if seq.request.first_token_time is None:
                seq.request.first_token_time = now
            touched[seq.request.request_id] = seq.request
        outputs = []
        for request in touched.values():
            if request.is_finished:
                request.finished_time = now
                self.requests.pop(request.request_id, None)
            elif request.beam is not None or request.width > request.params.n:
                continue  # beams and best_of are ranked only once finished
            outputs.append(self._make_output(request))
        return outputs

    def _fork_samples(self, sampling: list[Sequence]) -> list[int]:
        """Fork the first sequence of every n / best_of request that just computed its prompt
        into the request's other samples (appended to `sampling`, sharing its KV blocks and its
        logits row). Returns the logits row of each entry of `sampling`."""
        rows = list(range(len(sampling)))
        for row, seq in enumerate(list(sampling)):
            request = seq.request
            for _ in range(request.pending_forks):
                child = self._new_sequence(request, list(seq.token_ids))
                self.scheduler.fork(seq, child)
                sampling.append(child)
                rows.append(row)
            request.forked = True
        return rows

    def _record_beam_logprobs(self, logits: torch.Tensor, beams: list[Sequence]) -> list[Request]:
        """Keep each beam's next-token log-probs; run the beam step of every request whose live
        beams all have theirs. Returns the requests that finished."""
        finished = []
        for row, seq in enumerate(beams):
            temperature = seq.request.beam.params.temperature
            scaled = logits[row] / temperature if temperature > 0 else logits[row]
            seq.beam_logprobs = torch.log_softmax(scaled.float(), dim=-1)
            request = seq.request
            if request.first_token_time is None:
                request.first_token_time = time.perf_counter()
            if all(b.beam_logprobs is not None for b in request.seqs):
                self._beam_step(request)
                if request.is_finished:
                    finished.append(request)
        return finished

    def _beam_step(self, request: Request) -> None:
        beams = request.seqs
        continuations = request.beam.step([b.cumulative_logprob for b in beams],
                                          [b.output_token_ids for b in beams],
                                          torch.stack([b.beam_logprobs for b in beams]))
        for b in beams:
            b.beam_logprobs = None
        extended = {c.beam for c in continuations}
        for i, b in enumerate(beams):
            if i not in extended:
                self._finish(b, "length")  # dropped beam: frees its blocks (shared ones stay)
        request.seqs, request.forked = [], True
        placed: set[int] = set()
        continued = []
        for c in continuations:  # fork before any token is appended to the parent
            parent = beams[c.beam]
            if c.beam in placed:
                child = self._new_sequence(request, list(parent.token_ids))
                self.scheduler.fork(parent, child)
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

    def _append_token(self, seq: Sequence, token: int, logprob: float,
                      top: list[tuple[int, float]] | None) -> None:
        seq.token_ids.append(token)
        seq.cumulative_logprob += logprob
        if seq.params.logprobs is not None:
            entry = dict(top or [])
            entry[token] = logprob
            seq.logprobs.append(entry)
        params = seq.params
        if token in (params.stop_token_ids or ()):
            self._finish(seq, "stop", stop_reason=token)
            return
        if token in self.stop_token_ids and not params.ignore_eos:
            self._finish(seq, "stop")
            return
        if seq.detokenizer is not None:
            delta = seq.detokenizer.add(token)
            if seq.stop_matcher is not None:
                delta, stopped = seq.stop_matcher.feed(delta)
                seq.text += delta
                if stopped:
                    if params.include_stop_str_in_output:
                        seq.text += seq.stop_matcher.matched
                    self._finish(seq, "stop", stop_reason=seq.stop_matcher.matched)
                    return
            else:
                seq.text += delta
        if (params.max_tokens is not None and seq.num_output_tokens >= params.max_tokens) \
                or seq.num_tokens >= self.max_model_len:
            self._finish(seq, "length")

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None = None) -> None:
        if reason != "stop" and seq.detokenizer is not None:
            # Release text held back for an unfinished character or a possible stop string.
            tail = seq.detokenizer.flush()
            if seq.stop_matcher is not None:
                tail = seq.stop_matcher.feed(tail)[0] + seq.stop_matcher.flush()
            seq.text += tail
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        seq.status = SequenceStatus.FINISHED
        self.scheduler.remove(seq)

    def _make_output(self, request: Request) -> RequestOutput:
        if request.beam is not None:
            return self._make_beam_output(request)
        seqs = request.seqs
        if request.width > request.params.n and request.is_finished:  # best_of: the n most likely
            seqs = sorted(seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: request.params.n]
            for index, seq in enumerate(seqs):
                seq.index = index
        completions = []
        for seq in seqs:
            out_ids = seq.output_token_ids
            completions.append(CompletionOutput(
                index=seq.index, text=seq.text, token_ids=list(out_ids), finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason, cumulative_logprob=seq.cumulative_logprob,
                logprobs=list(seq.logprobs) if seq.params.logprobs is not None else None,
                delta_text=seq.text[seq.num_emitted_chars:], delta_token_ids=out_ids[seq.num_emitted_tokens:]))
            seq.num_emitted_chars = len(seq.text)
            seq.num_emitted_tokens = len(out_ids)
        metrics = RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time,
                                 len(request.prompt_token_ids), max(len(s.output_token_ids) for s in request.seqs))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             request.is_finished, metrics)

    def _make_beam_output(self, request: Request) -> RequestOutput:
        """The finished hypotheses, best first, as completions (`cumulative_logprob` is the
        hypothesis' log-probability; they are ranked by their length-penalised score)."""
        completions = []
        for index, hyp in enumerate(request.beam.finished):
            text = self.tokenizer.decode(hyp.token_ids) if self.tokenizer is not None else ""
            ends_with_eos = hyp.token_ids[-1] in request.beam.eos_token_ids
            completions.append(CompletionOutput(
                index=index, text=text, token_ids=list(hyp.token_ids), finish_reason="stop" if ends_with_eos
                else "length", cumulative_logprob=hyp.cum_logprob, delta_text=text,
                delta_token_ids=list(hyp.token_ids)))
        metrics = RequestMetrics(request.arrival_time, request.first_token_time, request.finished_time,
                                 len(request.prompt_token_ids), max((len(c.token_ids) for c in completions),
                                                                    default=0))
        return RequestOutput(request.request_id, request.prompt, request.prompt_token_ids, completions,
                             request.is_finished, metrics)

