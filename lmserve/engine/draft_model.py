"""Draft-model proposals for speculative decoding.

A smaller model with the target's vocabulary runs in the same engine with a paged KV cache of
its own (its own `BlockManager` and `ModelRunner`, as many token slots as the target's cache).
Each target sequence that speculates has a draft-side `Sequence`: its token ids, how many of
them the draft cache holds, and its block table there. Before a step the draft catches up on the
tokens the target accepted since its last proposal (the slots of its rejected guesses are given
back first), then samples k tokens one after another, all drafting sequences batched in each
forward. Sampled requests draw each proposal from the draft's distribution q (the request's
temperature, top-k, top-p and min-p applied) with the request's own generator, and keep q for
the rejection test; greedy ones take the draft's argmax. A draft sequence's blocks are freed
when its target sequence finishes or stops running.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import torch

from lmserve.config import EngineConfig, ModelConfig, SpeculativeConfig
from lmserve.engine.block_manager import BlockManager
from lmserve.engine.model_builder import build_model, common_sliding_window, fused_decoder_for
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.sampler import apply_filters
from lmserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from lmserve.engine.sequence import Sequence, SequenceStatus
from lmserve.errors import InvalidParameterError
from lmserve.loader import open_checkpoint

logger = logging.getLogger("lmserve")


@dataclass(eq=False)
class _DraftState:
    target: Sequence
    draft: Sequence  # token ids, computed count and block table in the draft's cache
    synced: int = 0  # leading tokens known to equal the target's


class DraftModelProposer:
    def __init__(self, config: SpeculativeConfig, engine_config: EngineConfig, target_config: ModelConfig,
                 target_tokenizer, num_blocks: int, max_model_len: int):
        start = time.perf_counter()
        checkpoint = open_checkpoint(config.model)
        _check_same_vocabulary(checkpoint, target_config, target_tokenizer)
        draft_config = replace(engine_config, quantization=config.quantization, speculative=None,
                               num_kv_blocks=num_blocks, preemption_mode="recompute")
        self.model = build_model(checkpoint, draft_config, max_model_len)
        self.block_manager = BlockManager(num_blocks, draft_config.block_size, enable_prefix_caching=False,
                                          sliding_window=common_sliding_window(self.model))
        self.runner = ModelRunner(self.model, checkpoint.config, draft_config, num_blocks,
                                  fused_decoder_for(checkpoint.config))
        self.states: dict[int, _DraftState] = {}
        logger.info("draft model %s (%s) ready in %.1f s", checkpoint.path, checkpoint.config.architecture,
                    time.perf_counter() - start)

    def propose(self, items: list[tuple[Sequence, int]]) -> None:
        """Set `spec_token_ids` (and, for sampled requests, `spec_draft_probs`) of each sequence,
        at most `room` proposals each."""
        for seq_id in [i for i, s in self.states.items() if s.target.status != SequenceStatus.RUNNING]:
            self.release(self.states[seq_id].target)
        states = [(self._sync(seq), room) for seq, room in items]
        drafted: dict[int, list[tuple[int, torch.Tensor | None]]] = {seq.seq_id: [] for seq, _ in items}
        for step in range(max((room for _, room in states), default=0)):
            active = [s for s, room in states if room > step and self._allocate(s)]
            if not active:
                break
            states = [(s, room) for s, room in states if s in active]  # one that could not allocate stops
            scheduled = [ScheduledSequence(s.draft, s.draft.num_tokens - s.draft.num_computed_tokens) for s in active]
            logits = self.runner.execute(SchedulerOutput(scheduled, self.block_manager.take_block_ops()))
            for s, r in zip(active, scheduled):
                s.draft.num_computed_tokens += r.num_tokens
            for s, (token, q) in zip(active, self._sample(logits, [s.target for s in active])):
                s.draft.token_ids.append(token)
                drafted[s.target.seq_id].append((token, q))
        for seq, _ in items:
            proposals = drafted[seq.seq_id]
            seq.spec_token_ids = [t for t, _ in proposals]
            probs = [q for _, q in proposals]
            seq.spec_draft_probs = torch.stack(probs) if probs and probs[0] is not None else None

    def release(self, seq: Sequence) -> None:
        state = self.states.pop(seq.seq_id, None)
        if state is not None:
            self.block_manager.free(state.draft)

    def _sync(self, seq: Sequence) -> _DraftState:
        """The draft-side state of `seq` with the target's tokens; what its cache computed past
        the first difference (rejected guesses) is dropped."""
        state = self.states.get(seq.seq_id)
        if state is None:
            draft = Sequence(seq.seq_id, seq.request, seq.index, [], seq.num_prompt_tokens, generator=None)
            state = self.states[seq.seq_id] = _DraftState(seq, draft)
        draft, tokens = state.draft, seq.token_ids
        same = state.synced
        while same < min(draft.num_computed_tokens, len(tokens)) and draft.token_ids[same] == tokens[same]:
            same += 1
        draft.num_computed_tokens = min(draft.num_computed_tokens, same)
        draft.token_ids = list(tokens)
        state.synced = len(tokens)
        self.block_manager.trim(draft, draft.num_computed_tokens)
        return state

    def _allocate(self, state: _DraftState) -> bool:
        draft = state.draft
        return self.block_manager.allocate(draft, draft.num_tokens)

    @staticmethod
    def _sample(logits: torch.Tensor, targets: list[Sequence]) -> list[tuple[int, torch.Tensor | None]]:
        """One proposal per row: the argmax for greedy requests, else a draw from q (the
        request's filters applied to the draft's logits) with the request's generator."""
        out = []
        for row, seq in zip(logits.float(), targets):
            if seq.params.greedy:
                out.append((int(row.argmax()), None))
                continue
            q = torch.softmax(apply_filters(row.unsqueeze(0), [seq.params])[0], dim=-1)
            token = torch.multinomial(q.to(seq.generator.device), 1, generator=seq.generator)
            out.append((int(token), q))
        return out


def _check_same_vocabulary(checkpoint, target_config: ModelConfig, target_tokenizer) -> None:
    draft_vocab, target_vocab = checkpoint.config.vocab_size, target_config.vocab_size
    if draft_vocab != target_vocab:
        raise InvalidParameterError("speculative.model", f"the draft model's vocabulary has {draft_vocab} entries, "
                                                         f"the target's {target_vocab}: they must share a tokenizer")
    draft_tokenizer = checkpoint.tokenizer
    if draft_tokenizer is not None and target_tokenizer is not None \
            and draft_tokenizer.backend.get_vocab() != target_tokenizer.backend.get_vocab():
        raise InvalidParameterError("speculative.model", "the draft model's tokenizer differs from the target's: "
                                                         "proposals would mean other tokens")
