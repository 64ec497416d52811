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


def build_tiny_model(kind: str, directory: Path, dtype=torch.float32):
    """Save a random model of `kind` under `directory`; return the transformers model (eval, fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1234)
    config = _configs()[kind]()
    model = AutoModelForCausalLM.from_config(config).to(dtype).eval()
    model.save_pretrained(directory)
    return model
