"""The synchronous engine core: requests in, per-step outputs out.

`add_request` queues a validated request (`InputProcessor`). Each `step()` is one pass of the
step contract: the scheduler decides the batch and its block operations (`SchedulerOutput`),
the runner runs them and one forward, the scheduler takes the computed tokens
(`update_from_output`), beams get their log-probs (`beam_search`), n / best_of requests fork
(`parallel_sampling`), the sampler picks one token per sampling sequence (within its
constraint's bitmask, computed while the forward runs: `structured_output`), and the
`OutputProcessor` appends it, detokenizes, applies stop conditions and builds the outputs of the
requests that progressed. A request may run with a LoRA adapter (`lora`): the manager loads
it, the scheduler bounds the adapters per step and the runner marks each token row's adapter.
There are no threads or asyncio here; the server and the `LLM` class
drive `step()` in a loop.
"""

from __future__ import annotations

import logging
import time
import weakref
from concurrent.futures import Future
from dataclasses import dataclass, replace

import numpy as np
import torch

from lmserve.config import EngineConfig, SpeculativeConfig
from lmserve.engine.beam_search import record_beam_logprobs
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.input_processor import InputProcessor
from lmserve.engine.model_builder import (build_model, common_sliding_window, context_limit, fused_decoder_for,
                                          num_kv_blocks_for, num_swap_blocks_for)
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.output_processor import OutputProcessor
from lmserve.engine.parallel_sampling import Forker
from lmserve.engine.draft_model import DraftModelProposer
from lmserve.engine.sampler import Sampler, SamplingRow, probabilities
from lmserve.engine.scheduler import Scheduler
from lmserve.engine.speculative import SpecStats, Speculator
from lmserve.engine.scoring import score_sequence
from lmserve.engine.sequence import Request, Sequence
from lmserve.engine.structured_output import StructuredOutputManager
from lmserve.engine.tensor_parallel import TensorParallelRunner, Workers
from lmserve.engine import xray
from lmserve import parallel
from lmserve.errors import InvalidParameterError
from lmserve.loader import Checkpoint
from lmserve.models import registry
from lmserve.lora import LoRARequest
from lmserve.lora.manager import LoRAManager, lora_dtype
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
    spec: SpecStats | None = None  # speculative decoding totals, when it is on


class LLMEngine:
    def __init__(self, checkpoint: Checkpoint, engine_config: EngineConfig):
        self.checkpoint = checkpoint
        self.config = engine_config
        self.model_config = cfg = checkpoint.config
        self.tokenizer = checkpoint.tokenizer
        num_blocks = num_kv_blocks_for(cfg, engine_config)
        self.max_model_len = context_limit(cfg, engine_config, num_blocks)
        num_swap_blocks = num_swap_blocks_for(cfg, engine_config)
        self.workers = self._start_workers(num_blocks, num_swap_blocks)
        start = time.perf_counter()
        with parallel.building(self.workers.group if self.workers is not None else parallel.SINGLE):
            self.model = build_model(checkpoint, engine_config, self.max_model_len)
        logger.info("loaded %s (%s) in %.1f s", checkpoint.path, cfg.architecture, time.perf_counter() - start)
        salt = f"{checkpoint.path}|{engine_config.torch_dtype}|{engine_config.kv_cache_dtype}"  # what changes K/V
        self.block_manager = BlockManager(num_blocks, engine_config.block_size,
                                          engine_config.enable_prefix_caching, salt, num_swap_blocks,
                                          common_sliding_window(self.model))
        self.scheduler = Scheduler(self.block_manager, engine_config.max_num_seqs,
                                   engine_config.max_num_batched_tokens, engine_config.preemption_mode,
                                   engine_config.max_loras)
        self.requests: dict[str, Request] = {}
        self.lora = LoRAManager(self.model, engine_config.max_loras, engine_config.max_lora_rank,
                                engine_config.max_cpu_loras, lora_dtype(engine_config, self.model),
                                _adapters_in_use(self.requests)) if engine_config.enable_lora else None
        self.runner = ModelRunner(self.model, cfg, engine_config, num_blocks, fused_decoder_for(cfg),
                                  self.lora.batch if self.lora is not None else None)
        if num_swap_blocks:
            self.runner.allocate_swap_space(num_swap_blocks)
        if self.workers is not None:
            self.workers.wait_ready()
            self.runner = TensorParallelRunner(self.runner, self.workers)
        self.sampler = Sampler()
        stop_ids = self.tokenizer.stop_token_ids if self.tokenizer is not None else cfg.eos_token_ids
        self.stop_token_ids = frozenset(stop_ids)
        self.structured = StructuredOutputManager(self.tokenizer, cfg.vocab_size, self.stop_token_ids)
        self.inputs = InputProcessor(self.tokenizer, cfg, engine_config, self.max_model_len, self.stop_token_ids,
                                     self.structured)
        self.speculator = self._speculator(engine_config.speculative, num_blocks)
        self.outputs = OutputProcessor(self.tokenizer, self.stop_token_ids, self.max_model_len,
                                       _releaser(self.scheduler, self.speculator))
        self.forker = Forker(self.inputs.new_sequence, self.scheduler)
        self.num_steps = 0  # engine steps run (the X-ray's and the timeline's step index)
        self.xray_requests: set[str] = set()  # live requests with params.xray (engine/xray.py)
        self.timeline = xray.Timeline()  # recent steps' composition, while watched

    def _start_workers(self, num_blocks: int, num_swap_blocks: int) -> Workers | None:
        """The other ranks of a tensor-parallel engine, started (None for one rank)."""
        size = self.config.tensor_parallel_size
        if size == 1:
            return None
        cfg = self.model_config
        if not registry.family(cfg.architecture).tensor_parallel:
            raise InvalidParameterError("tensor_parallel_size", f"the {cfg.architecture} family does not split "
                                                                f"across ranks; use 1")
        parallel.check_split(cfg.num_heads, cfg.num_kv_heads, size)
        workers = Workers(str(self.checkpoint.path), self.config, num_blocks, num_swap_blocks, self.max_model_len)
        weakref.finalize(self, workers.close)
        return workers

    def close(self) -> None:
        """Stop the tensor-parallel workers, if any (also done when the engine is collected)."""
        if self.workers is not None:
            self.workers.close()

    def _speculator(self, spec: SpeculativeConfig | None, num_blocks: int) -> Speculator | None:
        if spec is None:
            return None
        proposer = None
        if spec.method == "draft":
            proposer = DraftModelProposer(spec, self.config, self.model_config, self.tokenizer, num_blocks,
                                          self.max_model_len)
        return Speculator(spec, self.max_model_len, proposer)

    # ---- requests -------------------------------------------------------------------------

    def add_request(self, prompt: str | list[int], params: SamplingParams | BeamSearchParams | None = None,
                    request_id: str | None = None, lora_request: LoRARequest | None = None) -> str:
        """Queue a prompt; with `BeamSearchParams` it is decoded by beam search, and its output
        (reported once, when finished) holds the best hypotheses, best first. With `lora_request`
        it runs with that LoRA adapter (loaded now if it is not yet)."""
        request_id = request_id if request_id is not None else self.inputs.new_request_id()
        if request_id in self.requests:
            raise InvalidParameterError("request_id", f"{request_id!r} is already in use")
        request = self.inputs.make_request(request_id, prompt, params, self._adapter(lora_request))
        self.scheduler.add(request.seqs[0])
        self.requests[request_id] = request
        if getattr(request.params, "xray", False):
            self.xray_requests.add(request_id)
        return request_id

    # ---- LoRA adapters --------------------------------------------------------------------------

    def _adapter(self, lora_request: LoRARequest | None):
        if lora_request is None:
            return None
        if not isinstance(lora_request, LoRARequest):
            raise InvalidParameterError("lora_request", f"must be a LoRARequest, got {type(lora_request).__name__}")
        if self.lora is None:
            raise InvalidParameterError("lora_request", "this engine was started without enable_lora=True")
        return self.lora.get(lora_request)

    def add_lora(self, lora_request: LoRARequest) -> None:
        """Load an adapter now (a bad directory raises `InvalidParameterError` naming it)."""
        self._adapter(lora_request)

    def remove_lora(self, name: str) -> bool:
        """Unload adapter `name`; requests already running on it finish with it. False if unknown."""
        return self.lora is not None and self.lora.remove(name)

    def list_loras(self) -> list[LoRARequest]:
        return [adapter.request for adapter in self.lora.loaded.values()] if self.lora is not None else []

    def abort_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        self.xray_requests.discard(request_id)
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
            prefix_cache_hit_rate=blocks.prefix_cache_hit_rate,
            spec=replace(self.speculator.stats) if self.speculator is not None else None)

    # ---- one iteration ------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.speculator is not None:
            self.speculator.propose(self.scheduler.running)
        started = time.perf_counter()
        scheduled = self.scheduler.schedule()
        step = self.num_steps
        self.num_steps += 1
        timeline = self.timeline.begin(scheduled, step, self.scheduler.num_preemptions) \
            if self.timeline.active else None
        if self.xray_requests:
            xray.record_schedule(scheduled, step, started)
        masks = self._start_token_masks(scheduled)
        logits = self.runner.execute(scheduled)
        if logits is None:
            return []
        if self.xray_requests:
            xray.finish_prefill(scheduled, time.perf_counter())
        verifying = self.scheduler.update_from_output(scheduled)
        first_rows = np.cumsum([0] + [r.num_logits for r in verifying])[:-1].tolist()  # logits rows
        touched: dict[str, Request] = {}
        beams = [i for i, r in enumerate(verifying) if r.seq.request.beam is not None]
        if beams:
            for request in record_beam_logprobs(logits[[first_rows[i] for i in beams]],
                                                [verifying[i].seq for i in beams],
                                                self.forker.fork, self.outputs.finish):
                touched[request.request_id] = request
        sampling = [r.seq for r in verifying if r.seq.request.beam is None]
        first_rows = [row for row, r in zip(first_rows, verifying) if r.seq.request.beam is None]
        first_rows += [first_rows[i] for i in self.forker.fork_samples(sampling)[len(first_rows):]]
        # One sampler row per logits row a sequence gets; a verifying one's rows see the
        # proposals before them as generated tokens.
        rows, logit_rows, owners = [], [], []
        for seq, first in zip(sampling, first_rows):
            for j in range(len(seq.spec_token_ids) + 1):
                history = seq.output_token_ids + seq.spec_token_ids[:j] if j else seq.output_token_ids
                rows.append(SamplingRow(seq.params, seq.generator, seq.request.prompt_token_ids, history,
                                        self._token_mask(masks, seq)))
                logit_rows.append(first + j)
                owners.append(seq)
        if logit_rows != list(range(logits.shape[0])):
            logits = logits[logit_rows]
        stops = [self.stop_token_ids | set(s.params.stop_token_ids or ()) for s in owners]
        result = self.sampler(logits, rows, stops)
        records = None
        if self.xray_requests:
            wanted = [i for i, seq in enumerate(owners) if seq.params.xray]
            records = xray.token_records(logits, rows, stops, result.token_ids, wanted) if wanted else None
        now = time.perf_counter()
        row = 0
        for seq in sampling:
            tokens = result.token_ids[row: row + len(seq.spec_token_ids) + 1]
            logprobs = result.logprobs[row: row + len(tokens)]
            if seq.spec_draft_probs is not None and not seq.params.greedy:
                verify = slice(row, row + len(tokens))
                tokens = self.speculator.rejection_sample(seq, probabilities(logits[verify], rows[verify],
                                                                             stops[verify]))
                logprobs = _raw_logprobs(logits[row: row + len(tokens)], tokens)
            elif seq.spec_token_ids:
                tokens = self.speculator.accepted_tokens(seq.spec_token_ids, tokens)
            for j, token in enumerate(tokens):
                if records is not None and row + j in records:  # before a finish frees its blocks
                    xray.attach(seq, records[row + j], token, step, len(scheduled.scheduled), now)
                self.outputs.append_token(seq, token, logprobs[j], result.top_logprobs[row + j])
                if seq.is_finished:
                    break
            row += len(seq.spec_token_ids) + 1
            if seq.spec_token_ids and not seq.is_finished:
                self.scheduler.accept_proposals(seq, len(tokens) - 1)
            if seq.request.first_token_time is None:
                seq.request.first_token_time = now
            touched[seq.request.request_id] = seq.request
        outputs = []
        for request in touched.values():
            if request.is_finished:
                request.finished_time = now
                self.requests.pop(request.request_id, None)
                self.xray_requests.discard(request.request_id)
            output = self.outputs.make_output(request)
            if output is not None:
                outputs.append(output)
        if timeline is not None:
            self.timeline.end(timeline, started)
        return outputs

    def _start_token_masks(self, scheduled) -> tuple[dict[Sequence, int], Future] | None:
        """Start computing the allowed-token bitmasks of the constrained sequences that sample
        this step, on the grammar worker while the forward runs: {seq: mask row}, future."""
        constrained = [r.seq for r in scheduled if r.samples and r.seq.grammar is not None]
        if not constrained:
            return None
        return ({seq: i for i, seq in enumerate(constrained)},
                self.structured.submit([seq.grammar for seq in constrained]))

    def _token_mask(self, masks: tuple[dict[Sequence, int], Future] | None, seq: Sequence) -> torch.Tensor | None:
        if seq.grammar is None:
            return None
        if masks is not None and seq in masks[0]:
            return self.structured.result(masks[1])[masks[0][seq]]
        return self.structured.masks([seq.grammar])[0]  # a sample forked this step: not submitted

    def score(self, token_ids: list[int], lora_request: LoRARequest | None = None) -> torch.Tensor:
        """fp32 logits [len(token_ids), vocab] at every position of one sequence (the logits at
        position i predict token i + 1), computed by the same runner as generation."""
        return score_sequence(self.inputs.scoring_sequence(token_ids, self._adapter(lora_request)),
                              self.block_manager, self.runner, self.config.max_num_batched_tokens)


def _raw_logprobs(logits: torch.Tensor, tokens: list[int]) -> list[float]:
    """Each row's log-probability of its token under the model's unprocessed distribution."""
    chosen = logits.float().gather(1, torch.tensor(tokens, device=logits.device).unsqueeze(1)).squeeze(1)
    return (chosen - torch.logsumexp(logits.float(), dim=-1)).tolist()


def _adapters_in_use(requests: dict[str, Request]):
    """The LoRA manager's view of the adapters live requests run with: a closure over the
    engine's request table, not a bound method, for the same reason as `_releaser`."""
    return lambda: {request.lora for request in requests.values()} - {None}


def _releaser(scheduler: Scheduler, speculator: Speculator | None):
    """What the output processor calls for a finished sequence: it leaves the scheduler (its KV
    blocks are freed) and the proposer. A closure over those two, not a method of the engine, so
    that no reference cycle keeps a dropped engine (and its KV cache) alive until a GC pass."""
    def release(seq: Sequence) -> None:
        scheduler.remove(seq)
        if speculator is not None:
            speculator.release(seq)
    return release
