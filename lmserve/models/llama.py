"""The Llama family: Llama 2/3, SmolLM2, Mistral (sliding window), Qwen2 (q/k/v bias), Qwen3
(per-head q/k RMSNorm) and Phi-3 (q|k|v and gate|up fused in the checkpoint too, long RoPE). One
decoder layer is norm → attention → residual → norm → SwiGLU MLP → residual; the differences
between the family members are ModelConfig flags, set by their descriptors (`families.llama`)."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from lmserve import parallel
from lmserve.config import ModelConfig
from lmserve.layers.activation import SiluAndMul
from lmserve.layers.attention import AttentionMetadata, PagedAttention
from lmserve.layers.embedding import LMHead, VocabEmbedding
from lmserve.layers.linear import Linear, MergedLinear
from lmserve.layers.moe import SparseMoeBlock
from lmserve.layers.norm import RMSNorm
from lmserve.layers.rotary import RotaryEmbedding
from lmserve.models.fused_decoder import FusedLayer, FusedModel, NotFusable


class LlamaAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        q_heads, kv_heads = parallel.current().heads(cfg.num_heads, cfg.num_kv_heads)  # this rank's
        dim = cfg.head_dim
        self.num_heads, self.num_kv_heads = q_heads.stop - q_heads.start, kv_heads.stop - kv_heads.start
        self.head_dim = dim
        q_rows = slice(q_heads.start * dim, q_heads.stop * dim)
        kv_rows = slice(kv_heads.start * dim, kv_heads.stop * dim)
        q_size, kv_size = self.num_heads * dim, self.num_kv_heads * dim
        self.qkv_proj = MergedLinear(cfg.hidden_size, {"q": q_size, "k": kv_size, "v": kv_size}, bias=cfg.qkv_bias,
                                     checkpoint_rows={"q": q_rows, "k": kv_rows, "v": kv_rows},
                                     checkpoint_sizes={"q": cfg.num_heads * dim, "k": cfg.num_kv_heads * dim,
                                                       "v": cfg.num_kv_heads * dim})
        self.o_proj = Linear(q_size, cfg.hidden_size, bias=cfg.o_bias, checkpoint_cols=q_rows)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(dim, cfg.rms_norm_eps)
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, dim, dim ** -0.5, cfg.sliding_window)
        self.qk_norm = cfg.qk_norm

    def forward(self, x, rotary: RotaryEmbedding, cos, sin, meta: AttentionMetadata):
        qkv = self.qkv_proj(x)
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        v = qkv[:, (heads + kv_heads) * dim:].view(-1, kv_heads, dim)
        if self.qk_norm:
            q, k, _ = self.qkv_proj.split(qkv)
            q = self.q_norm(q.view(-1, heads, dim))
            k = self.k_norm(k.view(-1, kv_heads, dim))
            q, k = rotary(q, cos, sin), rotary(k, cos, sin)
        else:  # q and k heads side by side: one rotary call
            qk = rotary(qkv[:, : (heads + kv_heads) * dim].view(-1, heads + kv_heads, dim), cos, sin)
            q, k = qk[:, :heads], qk[:, heads:]
        return self.o_proj(self.attn(q, k, v, meta))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: ModelConfig, intermediate_size: int | None = None):
        super().__init__()
        full = intermediate_size or cfg.intermediate_size
        rows = parallel.current().part(full, unit=32)  # whole quantization groups of down_proj's input
        size = rows.stop - rows.start
        self.gate_up_proj = MergedLinear(cfg.hidden_size, {"gate": size, "up": size}, bias=cfg.mlp_bias,
                                         checkpoint_rows={"gate": rows, "up": rows},
                                         checkpoint_sizes={"gate": full, "up": full})
        self.down_proj = Linear(size, cfg.hidden_size, bias=cfg.mlp_bias, checkpoint_cols=rows)
        self.act = SiluAndMul()

    def forward(self, x):
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, mlp: nn.Module):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = mlp

    def forward(self, x, rotary, cos, sin, meta):
        x = x + self.self_attn(self.input_layernorm(x), rotary, cos, sin, meta)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaBackbone(nn.Module):
    def __init__(self, cfg: ModelConfig, make_mlp: Callable[[ModelConfig, int], nn.Module]):
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, make_mlp(cfg, i)) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class LlamaForCausalLM(nn.Module):
    """Parameter names follow the Hugging Face checkpoints (`model.layers.N...`, `lm_head`)."""

    packed_modules = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
                      "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}
    checkpoint_renames: dict[str, str] = {}

    def __init__(self, cfg: ModelConfig, max_model_len: int):
        super().__init__()
        self.config = cfg
        self.model = LlamaBackbone(cfg, self.make_mlp)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size,
                              tied_to=self.model.embed_tokens if cfg.tie_word_embeddings else None)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling,
                                      cfg.max_position_embeddings, max_model_len)

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
        """The feed-forward block of decoder layer `layer`; families with other MLPs override this."""
        return LlamaMLP(cfg)

    @property
    def ignored_checkpoint_suffixes(self) -> tuple[str, ...]:
        ignored = ("rotary_emb.inv_freq",)
        return ignored + (("lm_head.weight",) if self.config.tie_word_embeddings else ())

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.self_attn.attn for layer in self.model.layers]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos, sin = self.rotary.cos_sin(positions, x.dtype)
        for layer in self.model.layers:
            x = layer(x, self.rotary, cos, sin, meta)
        return self.model.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def fused_model(self) -> FusedModel:
        """The layout the native decoder runs (lmserve/models/fused_decoder.py)."""
        layers = []
        for i, layer in enumerate(self.model.layers):
            attn, mlp = layer.self_attn, layer.mlp
            norms = dict(q_norm=attn.q_norm if attn.qk_norm else None, k_norm=attn.k_norm if attn.qk_norm else None)
            if isinstance(mlp, SparseMoeBlock):
                layers.append(FusedLayer(layer.input_layernorm, attn.qkv_proj, attn.attn, self.rotary, attn.o_proj,
                                         layer.post_attention_layernorm, None, None, None, moe=mlp, **norms))
            elif isinstance(mlp, LlamaMLP):
                layers.append(FusedLayer(layer.input_layernorm, attn.qkv_proj, attn.attn, self.rotary, attn.o_proj,
                                         layer.post_attention_layernorm, mlp.gate_up_proj, mlp.act, mlp.down_proj,
                                         **norms))
            else:
                raise NotFusable(f"layer {i}'s feed-forward block is a {type(mlp).__name__}")
        return FusedModel(self.model.embed_tokens, layers, self.model.norm)

