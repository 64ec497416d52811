"""Scoring a token sequence: fp32 logits at every position, for perplexity and divergence
reports (`lmserve perplexity`, `lmserve.quality`).

The tokens are prefilled as one temporary sequence in chunks of at most `chunk` tokens through
the same runner as generation; its KV blocks are freed afterwards and never enter the prefix
cache. Each chunk asks the runner for every position's logits."""

from __future__ import annotations

import torch

from lmserve.engine.block_manager import BlockManager
from lmserve.engine.model_runner import ModelRunner
from lmserve.engine.scheduler_output import ScheduledSequence, SchedulerOutput
from lmserve.engine.sequence import Sequence
from lmserve.errors import InvalidParameterError


@torch.inference_mode()
def score_sequence(seq: Sequence, block_manager: BlockManager, runner: ModelRunner, chunk: int) -> torch.Tensor:
    """fp32 logits [len(seq.token_ids), vocab]; the logits at position i predict token i + 1."""
    n = seq.num_tokens
    if not block_manager.allocate(seq, n):
        raise InvalidParameterError("token_ids", f"{n} tokens need {block_manager.blocks_for(n)} KV "
                                                 f"blocks but only {block_manager.num_free_blocks} are free")
    logits: list[torch.Tensor] = []
    try:
        while seq.num_computed_tokens < n:
            size = min(chunk, n - seq.num_computed_tokens)
            logits.append(runner.execute(SchedulerOutput([ScheduledSequence(seq, size, all_logits=True)])))
            seq.num_computed_tokens += size
        return torch.cat(logits).float()
    finally:
        block_manager.free(seq)
