"""Tiny random-weight Hugging Face models, built with transformers and saved as safetensors,
so lmserve and transformers can be compared on exactly the same weights."""

from __future__ import annotations

from pathlib import Path

import torch

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
              initializer_range=0.08, bos_token_id=None, eos_token_id=None, pad_token_id=None)


def _configs():
    from transformers import LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    return {
        "llama_gqa": lambda: LlamaConfig(**COMMON),
        "llama_mqa_tied": lambda: LlamaConfig(**{**COMMON, "num_key_value_heads": 1}, tie_word_embeddings=True),
        "mistral_sliding": lambda: MistralConfig(**COMMON, sliding_window=7),
        "qwen2": lambda: Qwen2Config(**COMMON, tie_word_embeddings=False),
        "qwen3": lambda: Qwen3Config(**COMMON, head_dim=32, tie_word_embeddings=False),
        "llama3_rope": lambda: LlamaConfig(**COMMON, rope_scaling={
            "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32}),
        "yarn_rope": lambda: LlamaConfig(**COMMON, rope_scaling={
            "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}),
        "linear_rope": lambda: LlamaConfig(**COMMON, rope_scaling={"rope_type": "linear", "factor": 2.0}),
        "dynamic_rope": lambda: LlamaConfig(**COMMON, rope_scaling={"rope_type": "dynamic", "factor": 2.0}),
    }


TINY_MODELS = ["llama_gqa", "llama_mqa_tied", "mistral_sliding", "qwen2", "qwen3", "llama3_rope",
               "yarn_rope", "linear_rope", "dynamic_rope"]


# Families beyond Llama; their norm weights are randomised too (transformers initialises them to
# the identity, which would hide a wrong norm form).
_LONGROPE_HALF_DIM = 8  # head_dim 16 / 2


def _family_configs():
    from transformers import GPT2Config, Phi3Config
    from transformers.models.gemma3 import Gemma3TextConfig

    return {
        # window 7 < prompt; layer 1 global; local/global RoPE bases and global linear scaling differ
        "gemma3": lambda: Gemma3TextConfig(
            **{**COMMON, "num_hidden_layers": 3}, head_dim=16, sliding_window=7, query_pre_attn_scalar=24,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], final_logit_softcapping=3.0,
            rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e6},
                             "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
        "gpt2": lambda: GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                   activation_function="gelu_new", initializer_range=0.08,
                                   bos_token_id=None, eos_token_id=None),
        # prompt + 32 generated tokens cross original_max_position_embeddings (32)
        "phi3_longrope": lambda: Phi3Config(
            **COMMON, original_max_position_embeddings=32, rope_scaling={
                "rope_type": "longrope", "short_factor": [1.0 + 0.1 * i for i in range(_LONGROPE_HALF_DIM)],
                "long_factor": [1.0 + 0.7 * i for i in range(_LONGROPE_HALF_DIM)]}),
    }


FAMILY_TINY_MODELS = ["gemma3", "gpt2", "phi3_longrope"]


MOE_COMMON = dict(num_experts_per_tok=2, moe_intermediate_size=32)


def _moe_configs():
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    return {
        "mixtral": lambda: MixtralConfig(**COMMON, num_local_experts=4, num_experts_per_tok=2),
        # layer 1 dense, layer 0 sparse with a shared expert; routing weights not renormalised
        "qwen2_moe": lambda: Qwen2MoeConfig(**COMMON, **MOE_COMMON, num_experts=4, shared_expert_intermediate_size=96,
                                            mlp_only_layers=[1], norm_topk_prob=False),
        "qwen3_moe": lambda: Qwen3MoeConfig(**COMMON, **MOE_COMMON, num_experts=4, head_dim=32,
                                            norm_topk_prob=True),
    }


MOE_TINY_MODELS = ["mixtral", "qwen2_moe", "qwen3_moe"]


def build_tiny_model(kind: str, directory: Path, dtype=torch.float32):
    """Save a random model of `kind` under `directory`; return the transformers model (eval, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    config = {**_configs(), **_moe_configs(), **_family_configs()}[kind]()
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    if kind in FAMILY_TINY_MODELS:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.dim() == 1:
                    param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(directory)
    return model
