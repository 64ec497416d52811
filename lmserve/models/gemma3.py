"""Gemma 3 text models (Gemma3ForCausalLM, and the text part of llama.cpp's `gemma3` GGUF).

Differences from Llama, each a setting of the shared layers: token embeddings scaled by
sqrt(hidden_size) in the model dtype; RMSNorm in Gemma's (offset + weight) form, also on q and k;
norms both before and after attention and MLP; a GELU-tanh gated MLP; local sliding-window
layers and global layers in the model's pattern, each kind with its own RoPE base and scaling;
queries scaled by query_pre_attn_scalar; optional final logit soft-capping; tied LM head.
Its descriptor (`families.gemma3`) says how its Hugging Face and GGUF configs and tensors read.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from lmserve.config import ModelConfig
from lmserve.layers.activation import GatedActivation
from lmserve.layers.attention import AttentionMetadata, PagedAttention
from lmserve.layers.embedding import LMHead, VocabEmbedding
from lmserve.layers.norm import RMSNorm
from lmserve.layers.rotary import RotaryEmbedding
from lmserve.models.fused_decoder import FusedLayer, FusedModel
from lmserve.models.llama import LlamaAttention, LlamaForCausalLM, LlamaMLP


def _norm(cfg: ModelConfig, dim: int) -> RMSNorm:
    return RMSNorm(dim, cfg.rms_norm_eps, weight_offset=cfg.norm_weight_offset)


class Gemma3Attention(LlamaAttention):
    """Llama's fused-qkv attention with Gemma's q/k norms, query scaling and per-layer window."""

    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__(dataclasses.replace(cfg, qk_norm=False))
        self.qk_norm = True
        self.q_norm, self.k_norm = _norm(cfg, cfg.head_dim), _norm(cfg, cfg.head_dim)
        self.is_sliding = cfg.layer_types[layer] == "sliding_attention"
        self.attn = PagedAttention(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim,
                                   cfg.query_pre_attn_scalar ** -0.5, cfg.layer_sliding_window(layer))


class Gemma3MLP(LlamaMLP):
    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.act = GatedActivation(cfg.hidden_act)


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.input_layernorm = _norm(cfg, cfg.hidden_size)
        self.self_attn = Gemma3Attention(cfg, layer)
        self.post_attention_layernorm = _norm(cfg, cfg.hidden_size)
        self.pre_feedforward_layernorm = _norm(cfg, cfg.hidden_size)
        self.mlp = Gemma3MLP(cfg)
        self.post_feedforward_layernorm = _norm(cfg, cfg.hidden_size)

    def forward(self, x, rotary: RotaryEmbedding, cos, sin, meta: AttentionMetadata):
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), rotary, cos, sin, meta))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


class Gemma3Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = _norm(cfg, cfg.hidden_size)


class Gemma3ForCausalLM(nn.Module):
    """Parameter names follow the Hugging Face checkpoints (`model.layers.N...`)."""

    packed_modules = LlamaForCausalLM.packed_modules
    checkpoint_renames: dict[str, str] = {}
    ignored_checkpoint_suffixes = ("rotary_emb.inv_freq", "lm_head.weight")  # the LM head is always tied

    def __init__(self, cfg: ModelConfig, max_model_len: int):
        super().__init__()
        self.config = cfg
        self.model = Gemma3Backbone(cfg)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size, tied_to=self.model.embed_tokens)
        self.global_rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                             cfg.max_position_embeddings, max_model_len)
        self.local_rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_local_theta or cfg.rope_theta,
                                            cfg.rope_local_scaling, cfg.max_position_embeddings, max_model_len)
        self.embed_scale = cfg.hidden_size ** 0.5

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        # The scale is rounded to the model dtype first, as the reference implementation does.
        x = x * torch.tensor(self.embed_scale, dtype=x.dtype, device=x.device)
        local = (self.local_rotary, *self.local_rotary.cos_sin(positions, x.dtype))
        global_ = (self.global_rotary, *self.global_rotary.cos_sin(positions, x.dtype))
        for layer in self.model.layers:
            x = layer(x, *(local if layer.self_attn.is_sliding else global_), meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def fused_model(self) -> FusedModel:
        """The layout the native decoder runs (lmserve/models/fused_decoder.py)."""
        layers = [FusedLayer(layer.input_layernorm, attn.qkv_proj, attn.attn,
                             self.local_rotary if attn.is_sliding else self.global_rotary, attn.o_proj,
                             layer.pre_feedforward_layernorm, layer.mlp.gate_up_proj, layer.mlp.act,
                             layer.mlp.down_proj, q_norm=attn.q_norm, k_norm=attn.k_norm,
                             post_attention_norm=layer.post_attention_layernorm,
                             post_ffn_norm=layer.post_feedforward_layernorm)
                  for layer in self.model.layers for attn in (layer.self_attn,)]
        return FusedModel(self.model.embed_tokens, layers, self.model.norm, embed_scale=self.embed_scale)

