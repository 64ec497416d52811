"""Token and learned position embeddings, and the LM head that may share the token table."""

import torch
import torch.nn.functional as F
from torch import nn


class VocabEmbedding(nn.Module):
    """Looks up one row per token id."""

    def __init__(self, vocab_size: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, dim), requires_grad=False)

    def forward(self, token_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(token_ids, self.weight)


class LearnedPositionEmbedding(VocabEmbedding):
    """Absolute position embeddings (GPT-2): one learned row per position below `num_positions`,
    looked up by position instead of token id. The engine's context limit (max_model_len never
    exceeds the model's max_position_embeddings) keeps positions inside the table."""

    def __init__(self, num_positions: int, dim: int):
        super().__init__(num_positions, dim)


class LMHead(nn.Module):
    """Projects hidden states to vocabulary logits; `tied_to` reuses the embedding table."""

    def __init__(self, vocab_size: int, dim: int, tied_to: VocabEmbedding | None = None):
        super().__init__()
        self.tied_to = tied_to
        self.weight = None if tied_to is not None else nn.Parameter(
            torch.empty(vocab_size, dim), requires_grad=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.tied_to.weight if self.tied_to is not None else self.weight
        return F.linear(hidden, weight)
