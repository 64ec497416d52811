"""Random PEFT LoRA adapters written directly (no peft needed) for a model's shapes, as PEFT saves
them: `adapter_config.json` and `adapter_model.safetensors` with Hugging Face module names."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")


def projection_shapes(cfg) -> dict[str, tuple[int, int]]:
    """(out, in) of each Llama-family projection of an lmserve `ModelConfig`."""
    q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    return {"q_proj": (q, cfg.hidden_size), "k_proj": (kv, cfg.hidden_size), "v_proj": (kv, cfg.hidden_size),
            "o_proj": (cfg.hidden_size, q), "gate_proj": (cfg.intermediate_size, cfg.hidden_size),
            "up_proj": (cfg.intermediate_size, cfg.hidden_size), "down_proj": (cfg.hidden_size, cfg.intermediate_size)}


def write_random_adapter(directory: Path, cfg, targets=("q_proj", "v_proj"), rank: int = 8, alpha: float = 16,
                         seed: int = 0, std: float = 0.02) -> str:
    """An adapter of `rank` on `targets` in every layer, factors drawn with `std`; returns its path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    shapes = projection_shapes(cfg)
    tensors = {}
    for layer in range(cfg.num_layers):
        for target in targets:
            out_features, in_features = shapes[target]
            block = "self_attn" if target in _ATTENTION else "mlp"
            name = f"base_model.model.model.layers.{layer}.{block}.{target}"
            tensors[f"{name}.lora_A.weight"] = torch.randn(rank, in_features, generator=generator) * std
            tensors[f"{name}.lora_B.weight"] = torch.randn(out_features, rank, generator=generator) * std
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
              "bias": "none", "task_type": "CAUSAL_LM", "use_rslora": False}
    (directory / "adapter_config.json").write_text(json.dumps(config))
    return str(directory)
