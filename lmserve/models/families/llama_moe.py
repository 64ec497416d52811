"""Descriptors of the Llama decoders with mixture-of-experts MLPs (`models.llama_moe`): Mixtral,
Qwen2-MoE and Qwen3-MoE. (llama.cpp writes Mixtral as a `llama` GGUF file; `families.llama`
tells them apart.)"""

from __future__ import annotations

from lmserve.models.families.llama import attention_bias, llama_family, qwen_sliding_window

_MODEL_CLASS = "lmserve.models.llama_moe:LlamaMoeForCausalLM"


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
    llama_family("mixtral", "MixtralForCausalLM", model_class_path=_MODEL_CLASS, config_from_hf=_mixtral_from_hf),
    llama_family("qwen2_moe", "Qwen2MoeForCausalLM", "qwen2moe", model_class_path=_MODEL_CLASS,
                 config_from_hf=_qwen2_moe_from_hf),
    llama_family("qwen3_moe", "Qwen3MoeForCausalLM", "qwen3moe", model_class_path=_MODEL_CLASS,
                 quantize_gguf_arch="qwen3moe", config_from_hf=lambda cfg: {**_qwen_moe_from_hf(cfg), **attention_bias(cfg), "qk_norm": True},
                 gguf_metadata_defaults={"expert_weights_norm": True}),  # llama.cpp's graph renormalises
]
