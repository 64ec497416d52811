"""Token embedding and the LM head that may share its weight."""

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
