"""The synchronous engine core: requests in, per-step outputs out.

`add_request` queues a validated request (`InputProcessor`). Each `step()` is one pass of the
step contract: the scheduler decides the batch and its block operations (`SchedulerOutput`),
the runner runs them and one forward, the scheduler takes the computed tokens
(`update_from_output`), beams get their log-probs (`beam_search`), n / best_of requests fork
(`parallel_sampling`), the sampler picks one token per sampling sequence, and the
`OutputProcessor` appends it, detokenizes, applies stop conditions and builds the outputs of the
requests that progressed. There are no threads or asyncio here; the server and the `LLM` class
drive `step()` in a loop.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import torch

from lmserve.config import EngineConfig
from lmserve.engine.beam_search import record_beam_logprobs
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.input_processor import InputProcessor
from lmserve.engine.model_builder import (build_model, common_sliding_window, context_limit, fused_decoder_for,
                                          num_kv_blocks_for, num_swap_blocks_for)
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.output_processor import OutputProcessor
from lmserve.engine.parallel_sampling import Forker
from lmserve.engine.sampler import Sampler, SamplingRow
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from lmserve.engine.sequence import Request
from lmserve.errors import InvalidParameterError
from lmserve.loader import Checkpoint
from lmserve.outputs import RequestOutput
from lmserve.sampling_params import BeamSearchParams, SamplingParams

logger = logging.getLogger("lmserve")


@dataclass
class EngineStats:
    """How busy the engine is: requests running and waiting, KV-cache use, prefix-cache hits."""

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    prefix_cache_hit_rate: float = 0.0


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, engine_config: EngineConfig):
        self.checkpoint = checkpoint
        self.config = engine_config
        self.model_config = cfg = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        num_blocks = num_kv_blocks_for(cfg, engine_config)
        self.max_model_len = context_limit(cfg, engine_config, num_blocks)
        start = time.perf_counter()
        self.model = build_model(checkpoint, engine_config, self.max_model_len)
        logger.info("loaded %s (%s) in %.1f s", checkpoint.path, cfg.architecture, time.perf_counter() - start)
        salt = f"{checkpoint.path}|{engine_config.torch_dtype}|{engine_config.kv_cache_dtype}"  # what changes K/V
        num_swap_blocks = num_swap_blocks_for(cfg, engine_config)
        self.block_manager = BlockManager(num_blocks, engine_config.block_size,
                                          engine_config.enable_prefix_caching, salt, num_swap_blocks,
                                          common_sliding_window(self.model))
        self.scheduler = Scheduler(self.block_manager, engine_config.max_num_seqs,
                                   engine_config.max_num_batched_tokens, engine_config.preemption_mode)
        self.runner = ModelRunner(self.model, cfg, engine_config, num_blocks, fused_decoder_for(cfg))
        if num_swap_blocks:
            self.runner.allocate_swap_space(num_swap_blocks)
        self.sampler = Sampler()
        self.requests: dict[str, Request] = {}
        stop_ids = self.tokenizer.stop_token_ids if self.tokenizer is not None else cfg.eos_token_ids
        self.stop_token_ids = frozenset(stop_ids)
        self.inputs = InputProcessor(self.tokenizer, cfg, engine_config, self.max_model_len, self.stop_token_ids)
        self.outputs = OutputProcessor(self.tokenizer, self.stop_token_ids, self.max_model_len, self.scheduler.remove)
        self.forker = Forker(self.inputs.new_sequence, self.scheduler)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | BeamSearchParams | None = None,
                    request_id: str | None = None) -> str:
        """Queue a prompt; with `BeamSearchParams` it is decoded by beam search, and its output
        (reported once, when finished) holds the best hypotheses, best first."""
        request_id = request_id if request_id is not None else self.inputs.new_request_id()
        if request_id in self.requests:
            raise InvalidParameterError("request_id", f"{request_id!r} is already in use")
        request = self.inputs.make_request(request_id, prompt, params)
        self.scheduler.add(request.seqs[0])
        self.requests[request_id] = request
        return request_id

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is None:
            return
        for seq in request.seqs:
            if not seq.is_finished:
                self.outputs.finish(seq, "abort")

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished()

    def stats(self) -> EngineStats:
        scheduler, blocks = self.scheduler, self.block_manager
        return EngineStats(
            num_running=len({s.request.request_id for s in scheduler.running}),
            num_waiting=len({s.request.request_id for s in scheduler.waiting}),
            kv_cache_usage=blocks.num_used_blocks / blocks.num_blocks if blocks.num_blocks else 0.0,
            prefix_cache_hit_rate=blocks.prefix_cache_hit_rate)

    # ---- one iteration ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        scheduled = self.scheduler.schedule()
        logits = self.runner.execute(scheduled)
        if logits is None:
            return []
        sampling = self.scheduler.update_from_output(scheduled)
        touched: dict[str, Request] = {}
        beam_rows = [i for i, s in enumerate(sampling) if s.request.beam is not None]
        if beam_rows:
            for request in record_beam_logprobs(logits[beam_rows], [sampling[i] for i in beam_rows],
                                                self.forker.fork, self.outputs.finish):
                touched[request.request_id] = request
            keep = [i for i, s in enumerate(sampling) if s.request.beam is None]
            logits, sampling = logits[keep], [sampling[i] for i in keep]
        rows_of_samples = self.forker.fork_samples(sampling)
        if len(rows_of_samples) != logits.shape[0]:
            logits = logits[rows_of_samples]
        rows = [SamplingRow(s.params, s.generator, s.request.prompt_token_ids, s.output_token_ids)
                for s in sampling]
        result = self.sampler(logits, rows, [self.stop_token_ids | set(s.params.stop_token_ids or ())
                                             for s in sampling])
        now = time.perf_counter()
        for i, seq in enumerate(sampling):
            self.outputs.append_token(seq, result.token_ids[i], result.logprobs[i], result.top_logprobs[i])
            if seq.request.first_token_time is None:
                seq.request.first_token_time = now
            touched[seq.request.request_id] = seq.request
        outputs = []
        for request in touched.values():
            if request.is_finished:
                request.finished_time = now
                self.requests.pop(request.request_id, None)
            output = self.outputs.make_output(request)
            if output is not None:
                outputs.append(output)
        return outputs

    # ---- scoring ------------------------------------------------------------------------------

    @torch.inference_mode()
    def score(self, token_ids: list[int]) -> torch.Tensor:
        """fp32 logits [len(token_ids), vocab] at every position of one sequence (the logits at
        position i predict token i + 1), for perplexity and divergence reports.

        The tokens are prefilled as one temporary sequence in chunks of at most
        max_num_batched_tokens, through the same runner as generation; its KV blocks are freed
        afterwards and never enter the prefix cache."""
        seq = self.inputs.scoring_sequence(token_ids)
        n = seq.num_tokens
        if not self.block_manager.allocate(seq, n):
            raise InvalidParameterError("token_ids", f"{n} tokens need {self.block_manager.blocks_for(n)} KV "
                                                     f"blocks but only {self.block_manager.num_free_blocks} are free")
        # The runner returns logits of sampling positions only; take the final hidden states of
        # every position from the model's output instead.
        hidden: list[torch.Tensor] = []
        hook = self.model.register_forward_hook(lambda module, args, output: hidden.append(output))
        try:
            while seq.num_computed_tokens < n:
                chunk = min(self.config.max_num_batched_tokens, n - seq.num_computed_tokens)
                self.runner.execute(SchedulerOutput([ScheduledSequence(seq, chunk)]))
                seq.num_computed_tokens += chunk
            return torch.cat([self.model.compute_logits(h) for h in hidden]).float()
        finally:
            hook.remove()
            self.block_manager.free(seq)
