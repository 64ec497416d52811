"""Attention over the paged KV cache.

Each layer owns one cache tensor shaped [2, num_slots, num_kv_heads, head_dim] (K and V; a slot
is one token position inside one block). A forward step first writes the new tokens' K/V into
their slots (`slot_mapping`, one indexed copy), then computes attention for every scheduled
sequence at once: the model runner packs sequences into padded groups (`AttentionGroup`), each
holding the query token indices, the cache slots of the context and the positions needed for
the causal and sliding-window masks. Prefill chunks and decode tokens go in separate groups so
one long prompt does not pad every decode row to its length.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class AttentionGroup:
    """Sequences padded to a common query length Q and context length K."""

    token_index: torch.Tensor  # [B, Q] index into the step's flat token axis (padding repeats a valid index)
    query_valid: torch.Tensor  # [B, Q] bool
    query_pos: torch.Tensor  # [B, Q] absolute position of each query token
    kv_slots: torch.Tensor  # [B, K] cache slot of each context position (padding: slot 0)
    key_pos: torch.Tensor  # [B, K] absolute position of each key; padding is larger than any query
    _masks: dict = field(default_factory=dict)

    def mask(self, sliding_window: int | None) -> torch.Tensor:
        """[B, 1, Q, K] bool, True where a query may attend a key."""
        if sliding_window not in self._masks:
            q = self.query_pos[:, :, None]
            k = self.key_pos[:, None, :]
            allowed = k <= q
            if sliding_window is not None:
                allowed &= (q - k) < sliding_window
            # Padded query rows attend everything so no row is all -inf (their output is discarded).
            allowed |= ~self.query_valid[:, :, None]
            self._masks[sliding_window] = allowed.unsqueeze(1)
        return self._masks[sliding_window]


@dataclass
class AttentionMetadata:
    """Everything the attention layers need for one forward step."""

    slot_mapping: torch.Tensor  # [T] where each new token's K/V is written
    groups: list[AttentionGroup]
    num_tokens: int


class PagedAttention(nn.Module):
    """Causal (optionally sliding-window) MHA/GQA/MQA reading K/V through block tables."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.kv_cache: torch.Tensor | None = None  # bound by the model runner

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the step's tokens; returns [T, H*D]."""
        cache = self.kv_cache
        cache[0].index_copy_(0, meta.slot_mapping, k.to(cache.dtype))
        cache[1].index_copy_(0, meta.slot_mapping, v.to(cache.dtype))
        out = q.new_empty(q.shape)
        for group in meta.groups:
            qg = q[group.token_index].transpose(1, 2)  # [B, H, Q, D]
            kg = cache[0][group.kv_slots].to(q.dtype).transpose(1, 2)  # [B, Hkv, K, D]
            vg = cache[1][group.kv_slots].to(q.dtype).transpose(1, 2)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=group.mask(self.sliding_window), scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads)
            og = og.transpose(1, 2)  # [B, Q, H, D]
            out[group.token_index[group.query_valid]] = og[group.query_valid]
        return out.reshape(q.shape[0], -1)
