"""Attention over the paged KV cache.

Each layer owns one cache tensor shaped [2, num_slots, num_kv_heads, head_dim] (K and V; a slot
is one token position inside one block), stored in the compute dtype or, quantized, as int8 or
fp8 with one scale per token and head. A forward step first writes the new tokens' K/V into
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
    # True when the group's B x Q queries are the step's tokens in order with no padding (a pure
    # decode step, or one prompt chunk): the query and output need no gather or scatter.
    covers_step: bool = False
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
        # Bound by the model runner: [2, slots, Hkv, D] and, for an int8/fp8 cache, one scale per
        # token and head, [2, slots, Hkv].
        self.kv_cache: torch.Tensor | None = None
        self.kv_scales: torch.Tensor | None = None

    def _write(self, i: int, x: torch.Tensor, slots: torch.Tensor) -> None:
        cache = self.kv_cache[i]
        if self.kv_scales is None:
            cache.index_copy_(0, slots, x.to(cache.dtype))
            return
        qmax = 127.0 if cache.dtype == torch.int8 else torch.finfo(cache.dtype).max
        scale = x.float().abs().amax(dim=-1).clamp(min=1e-8) / qmax
        # Clamp: x / scale can land a rounding error above qmax, which fp8 turns into NaN.
        scaled = (x.float() / scale.unsqueeze(-1)).clamp(-qmax, qmax)
        packed = (scaled.round() if cache.dtype == torch.int8 else scaled).to(cache.dtype)
        # Byte views: CPU kernels do not index fp8 tensors.
        cache.view(torch.uint8).index_copy_(0, slots, packed.view(torch.uint8))
        self.kv_scales[i].index_copy_(0, slots, scale)

    def _read(self, i: int, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """[B, Hkv, K, D] context of a group, dequantized to the compute dtype."""
        if self.kv_scales is None:
            x = self.kv_cache[i][slots]
        else:
            cache = self.kv_cache[i]
            x = cache.view(torch.uint8)[slots].view(cache.dtype).float() * self.kv_scales[i][slots].unsqueeze(-1)
        return x.to(dtype).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """q: [T, H, D], k/v: [T, Hkv, D] for the step's tokens; returns [T, H*D]."""
        self._write(0, k, meta.slot_mapping)
        self._write(1, v, meta.slot_mapping)
        out = None  # filled group by group unless one group covers the step
        for group in meta.groups:
            if group.covers_step:
                qg = q.view(*group.token_index.shape, *q.shape[1:]).transpose(1, 2)
            else:
                qg = q[group.token_index].transpose(1, 2)  # [B, H, Q, D]
            kg = self._read(0, group.kv_slots, q.dtype)
            vg = self._read(1, group.kv_slots, q.dtype)
            og = F.scaled_dot_product_attention(
                qg, kg, vg, attn_mask=group.mask(self.sliding_window), scale=self.scale,
                enable_gqa=self.num_kv_heads != self.num_heads)
            og = og.transpose(1, 2)  # [B, Q, H, D]
            if group.covers_step:
                return og.reshape(q.shape[0], -1)
            if out is None:
                out = q.new_empty(q.shape)
            out[group.token_index[group.query_valid]] = og[group.query_valid]
        return out.reshape(q.shape[0], -1)
