"""GPT-2: the textbook decoder. Token embeddings plus learned absolute position embeddings, then
N x (LayerNorm -> attention -> residual -> LayerNorm -> GELU MLP -> residual), all projections
biased, no RoPE. The context is limited to `n_positions` (the position table's size), which the
engine enforces as the model's max_position_embeddings.

Hugging Face checkpoints store the projections as Conv1D weights, [in, out]; they are transposed
once at load into the usual [out, in] layout (llama.cpp's GGUF already stores them that way).
The fused `c_attn` (q|k|v) loads whole into one MergedLinear. Its descriptor is `families.gpt2`.
"""

from __future__ import annotations

import torch
from torch import nn

from lmserve import parallel
from lmserve.config import ModelConfig
from lmserve.layers.activation import Activation
from lmserve.layers.attention import AttentionMetadata, PagedAttention
from lmserve.layers.embedding import LearnedPositionEmbedding, LMHead, VocabEmbedding
from lmserve.layers.linear import Linear, MergedLinear
from lmserve.layers.norm import LayerNorm
from lmserve.models.fused_decoder import FusedLayer, FusedModel


class _Conv1DCheckpoint:
    """Mixin for a Linear whose checkpoint weight may arrive as a Conv1D [in, out] matrix."""

    transposed_checkpoint = False

    def load_shard(self, param_name: str, tensor: torch.Tensor, shard: str | None = None, **kwargs) -> None:
        if self.transposed_checkpoint and param_name == "weight":
            tensor = tensor.t().contiguous()
        super().load_shard(param_name, tensor, shard, **kwargs)


class Conv1DLinear(_Conv1DCheckpoint, Linear):
    pass


class Conv1DMergedLinear(_Conv1DCheckpoint, MergedLinear):
    pass


def _projection(layer: Linear, cfg: ModelConfig) -> Linear:
    layer.transposed_checkpoint = cfg.conv1d_weights
    return layer


class GPT2Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        hidden = cfg.hidden_size
        heads, _ = parallel.current().heads(cfg.num_heads, cfg.num_heads)  # this rank's
        self.num_heads, self.head_dim = heads.stop - heads.start, cfg.head_dim
        rows, size = slice(heads.start * cfg.head_dim, heads.stop * cfg.head_dim), self.num_heads * cfg.head_dim
        self.c_attn = _projection(Conv1DMergedLinear(
            hidden, {"q": size, "k": size, "v": size}, bias=True, checkpoint_rows={"q": rows, "k": rows, "v": rows},
            checkpoint_sizes={"q": hidden, "k": hidden, "v": hidden}), cfg)
        self.c_proj = _projection(Conv1DLinear(size, hidden, bias=True, checkpoint_cols=rows), cfg)
        self.attn = PagedAttention(self.num_heads, self.num_heads, cfg.head_dim, cfg.head_dim ** -0.5)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        q, k, v = (t.view(-1, self.num_heads, self.head_dim) for t in self.c_attn.split(self.c_attn(x)))
        return self.c_proj(self.attn(q, k, v, meta))


class GPT2MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        rows = parallel.current().part(cfg.intermediate_size, unit=32)  # this rank's slice
        size = rows.stop - rows.start
        self.c_fc = _projection(Conv1DLinear(cfg.hidden_size, size, bias=True, checkpoint_rows=rows), cfg)
        self.c_proj = _projection(Conv1DLinear(size, cfg.hidden_size, bias=True, checkpoint_cols=rows), cfg)
        self.act = Activation(cfg.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(x)))


class GPT2Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln_1 = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = GPT2Attention(cfg)
        self.ln_2 = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GPT2MLP(cfg)

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), meta)
        return x + self.mlp(self.ln_2(x))


class GPT2Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.wte = VocabEmbedding(cfg.vocab_size, cfg.hidden_size)
        self.wpe = LearnedPositionEmbedding(cfg.max_position_embeddings, cfg.hidden_size)
        self.h = nn.ModuleList(GPT2Block(cfg) for _ in range(cfg.num_layers))
        self.ln_f = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps)


class GPT2LMHeadModel(nn.Module):
    """Parameter names follow transformers' GPT2LMHeadModel (`transformer.h.N...`, `lm_head`)."""

    packed_modules: dict[str, tuple[str, str]] = {}
    checkpoint_renames: dict[str, str] = {}
    # Older checkpoints also store the causal-mask buffers of each attention layer.
    _IGNORED = (".attn.bias", ".attn.masked_bias")

    def __init__(self, cfg: ModelConfig, max_model_len: int):
        super().__init__()
        self.config = cfg
        self.transformer = GPT2Transformer(cfg)
        self.lm_head = LMHead(cfg.vocab_size, cfg.hidden_size,
                              tied_to=self.transformer.wte if cfg.tie_word_embeddings else None)

    @property
    def ignored_checkpoint_suffixes(self) -> tuple[str, ...]:
        return self._IGNORED + (("lm_head.weight",) if self.config.tie_word_embeddings else ())

    def attention_layers(self) -> list[PagedAttention]:
        return [block.attn.attn for block in self.transformer.h]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        x = self.transformer.wte(input_ids) + self.transformer.wpe(positions)
        for block in self.transformer.h:
            x = block(x, meta)
        return self.transformer.ln_f(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

    def fused_model(self) -> FusedModel:
        """The layout the native decoder runs (lmserve/models/fused_decoder.py): no rotary, learned
        positions, LayerNorms, biased projections, a plain GELU MLP."""
        t = self.transformer
        layers = [FusedLayer(block.ln_1, block.attn.c_attn, block.attn.attn, None, block.attn.c_proj, block.ln_2,
                             block.mlp.c_fc, block.mlp.act, block.mlp.c_proj) for block in t.h]
        return FusedModel(t.wte, layers, t.ln_f, positions=t.wpe)

