"""Rotary position embedding (RoPE) with the scaling variants checkpoints declare.

Scaling is given as a Hugging Face style dict (`rope_type` plus its parameters); the inverse
frequencies are computed once and a cos/sin table over all positions is built at start-up, so a
forward pass only gathers rows of it.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from lmserve.errors import InvalidParameterError

SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _base_inv_freq(dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def _llama3_inv_freq(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = s["factor"], s.get("low_freq_factor", 1.0), s.get("high_freq_factor", 4.0)
    old_len = s["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_inv_freq(dim: int, theta: float, s: dict, max_position: int) -> tuple[torch.Tensor, float]:
    original = s.get("original_max_position_embeddings") or max_position
    factor = s.get("factor") or max_position / original

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast, beta_slow = s.get("beta_fast") or 32, s.get("beta_slow") or 1

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation_weight = 1 - ramp
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_weight) + (1.0 / pos_freqs) * extrapolation_weight
    return inv_freq, float(attention_factor)


def _longrope_inv_freq(dim: int, theta: float, s: dict, max_position: int,
                       max_model_len: int) -> tuple[torch.Tensor, float]:
    """Phi-3's LongRoPE: per-frequency divisors, `long_factor` when the context can exceed the
    pre-training length, `short_factor` otherwise. transformers decides per forward call by the
    sequence length; an engine fixes the context up front, so (as llama.cpp does with its context
    size) the choice is made once for max_model_len, which agrees with transformers on any
    sequence that reaches that length."""
    original = s["original_max_position_embeddings"]
    factor = s.get("factor") or max_position / original
    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        attention_factor = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    ext_factors = s["long_factor"] if max_model_len > original else s["short_factor"]
    if len(ext_factors) != dim // 2:
        raise InvalidParameterError("rope_scaling", f"longrope factors need {dim // 2} entries (rotary dim / 2), "
                                                    f"got {len(ext_factors)}")
    ext = torch.tensor(ext_factors, dtype=torch.float32)
    return 1.0 / (ext * theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)), float(attention_factor)


def compute_inv_freq(dim: int, theta: float, scaling: dict | None, max_position: int,
                     max_model_len: int) -> tuple[torch.Tensor, float]:
    """Inverse frequencies and the cos/sin multiplier for one RoPE configuration."""
    s = dict(scaling or {})
    rope_type = s.get("rope_type", s.get("type", "default"))
    if rope_type == "default":
        return _base_inv_freq(dim, theta), 1.0
    if rope_type == "linear":
        return _base_inv_freq(dim, theta) / s["factor"], 1.0
    if rope_type == "dynamic":
        # Dynamic NTK grows the base once the context passes the trained length; an engine fixes the
        # context up front, so the base is chosen for max_model_len (unchanged when it fits).
        seq_len = max(max_model_len, max_position)
        factor = s["factor"]
        base = theta * ((factor * seq_len / max_position) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(dim, base), 1.0
    if rope_type == "llama3":
        s.setdefault("original_max_position_embeddings", max_position)
        return _llama3_inv_freq(_base_inv_freq(dim, theta), s), 1.0
    if rope_type == "yarn":
        return _yarn_inv_freq(dim, theta, s, max_position)
    if rope_type == "longrope":
        return _longrope_inv_freq(dim, theta, s, max_position, max_model_len)
    raise InvalidParameterError("rope_scaling", f"unsupported rope_type {rope_type!r} "
                                f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")


class RotaryEmbedding(nn.Module):
    """Applies rotate-half (GPT-NeoX layout) RoPE to the first `rotary_dim` dims of q and k."""

    def __init__(self, rotary_dim: int, theta: float, scaling: dict | None, max_position: int,
                 max_model_len: int):
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq, attention_factor = compute_inv_freq(rotary_dim, theta, scaling, max_position, max_model_len)
        positions = torch.arange(max(max_model_len, 1), dtype=torch.float32)
        freqs = positions[:, None] * inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos_cache", emb.cos() * attention_factor, persistent=False)
        # sin with the rotate-half sign folded in: x * cos + roll(x, half) * signed_sin equals
        # x * cos + cat(-x2, x1) * sin, in two fewer ops per call.
        sin = emb.sin() * attention_factor
        sin[:, : rotary_dim // 2] *= -1
        self.register_buffer("sin_cache", sin, persistent=False)

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows of the table for `positions`, shaped [T, 1, rotary_dim] to broadcast over heads."""
        return (self.cos_cache[positions].unsqueeze(1).to(dtype),
                self.sin_cache[positions].unsqueeze(1).to(dtype))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x: [T, heads, head_dim]."""
        rot, rest = x[..., : self.rotary_dim], x[..., self.rotary_dim:]
        out = rot * cos + rot.roll(self.rotary_dim // 2, dims=-1) * sin
        return out if rest.shape[-1] == 0 else torch.cat((out, rest), dim=-1)
