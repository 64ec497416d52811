"""Llama-style decoders whose feed-forward blocks are sparse mixtures of experts: Mixtral (top-2
of 8, renormalised weights), Qwen2-MoE (shared expert with a sigmoid gate, q/k/v bias, dense
layers by `decoder_sparse_step` / `mlp_only_layers`) and Qwen3-MoE (`norm_topk_prob`, q/k norm).

Attention, norms and residuals are the Llama decoder's; only the MLP differs, and the
differences between the three families are ModelConfig fields, set by their descriptors in
`FAMILIES`. (llama.cpp writes Mixtral as a `llama` GGUF file; `models.llama` tells them apart.)
"""

from __future__ import annotations

from torch import nn

from lmserve.config import ModelConfig
from lmserve.layers.moe import SparseMoeBlock
from lmserve.models.llama import LlamaForCausalLM, LlamaMLP, attention_bias, llama_family, qwen_sliding_window


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


def _mixtral_from_hf(cfg: dict) -> dict:
    """Every layer sparse, experts as wide as intermediate_size, weights always renormalised."""
    return dict(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)


def _qwen_moe_from_hf(cfg: dict) -> dict:
    """Qwen2-/Qwen3-MoE: expert sizes and routing, dense layers by decoder_sparse_step / mlp_only_layers."""
    return dict(num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
                num_experts_per_tok=cfg["num_experts_per_tok"],
                moe_intermediate_size=cfg["moe_intermediate_size"],
                shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
                norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
                mlp_only_layers=list(cfg.get("mlp_only_layers") or []),
                **qwen_sliding_window(cfg))


def _qwen2_moe_from_hf(cfg: dict) -> dict:
    """Qwen2-MoE's q/k/v projections are biased unless its config says `qkv_bias: false`."""
    return {**_qwen_moe_from_hf(cfg), "qkv_bias": bool(cfg.get("attention_bias", False) or cfg.get("qkv_bias", True))}


FAMILIES = [
    llama_family("mixtral", "MixtralForCausalLM", model_class=LlamaMoeForCausalLM, config_from_hf=_mixtral_from_hf),
    llama_family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2moe", model_class=LlamaMoeForCausalLM,
                 config_from_hf=_qwen2_moe_from_hf),
    llama_family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe", model_class=LlamaMoeForCausalLM,
                 config_from_hf=lambda cfg: {**_qwen_moe_from_hf(cfg), **attention_bias(cfg), "qk_norm": True},
                 gguf_metadata_defaults={"expert_weights_norm": True}),  # llama.cpp's graph renormalises
]
