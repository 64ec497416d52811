"""Llama-style decoders whose feed-forward blocks are sparse mixtures of experts: Mixtral (top-2
of 8, renormalised weights), Qwen2-MoE (shared expert with a sigmoid gate, q/k/v bias, dense
layers by `decoder_sparse_step` / `mlp_only_layers`) and Qwen3-MoE (`norm_topk_prob`, q/k norm).

Attention, norms and residuals are the Llama decoder's; only the MLP differs, and the
differences between the three families are ModelConfig fields, set by their descriptors
(`families.llama_moe`).
"""

from __future__ import annotations

from torch import nn

from lmserve.config import ModelConfig
from lmserve.layers.moe import SparseMoeBlock
from lmserve.models.llama import LlamaForCausalLM, LlamaMLP


class LlamaMoeForCausalLM(LlamaForCausalLM):
    # Mixtral checkpoints call the MoE block and its expert projections by older names.
    checkpoint_renames = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.",
                          ".w2.": ".down_proj."}

    @staticmethod
    def make_mlp(cfg: ModelConfig, layer: int) -> nn.Module:
        if not cfg.is_moe_layer(layer):
            return LlamaMLP(cfg)
        shared = (LlamaMLP(cfg, cfg.shared_expert_intermediate_size)
                  if cfg.shared_expert_intermediate_size else None)
        return SparseMoeBlock(cfg.hidden_size, cfg.num_experts, cfg.num_experts_per_tok,
                              cfg.moe_intermediate_size, cfg.norm_topk_prob, shared)

