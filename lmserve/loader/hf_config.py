"""Translate a Hugging Face `config.json` into a `ModelConfig`."""

from __future__ import annotations

from lmserve.config import ModelConfig
from lmserve.errors import InvalidParameterError, ModelLoadError

# HF `architectures` entry -> lmserve family key
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict) from either the old (`rope_theta` + `rope_scaling`) or the new
    (`rope_parameters`) config layout."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn"):
        params.setdefault("original_max_position_embeddings",
                          cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"])
    return float(theta), params


def _moe_settings(cfg: dict, family: str) -> dict:
    """ModelConfig's mixture-of-experts fields (empty for dense families)."""
    if family == "mixtral":  # every layer sparse, experts as wide as intermediate_size, always renormalised
        return dict(num_experts=cfg["num_local_experts"], num_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["intermediate_size"], norm_topk_prob=True)
    if family in ("qwen2_moe", "qwen3_moe"):
        return dict(num_experts=cfg.get("num_experts") or cfg["num_local_experts"],
                    num_experts_per_tok=cfg["num_experts_per_tok"],
                    moe_intermediate_size=cfg["moe_intermediate_size"],
                    shared_expert_intermediate_size=cfg.get("shared_expert_intermediate_size") or 0,
                    norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
                    decoder_sparse_step=cfg.get("decoder_sparse_step") or 1,
                    mlp_only_layers=list(cfg.get("mlp_only_layers") or []))
    return {}


def model_config_from_hf(cfg: dict, path: str) -> ModelConfig:
    archs = cfg.get("architectures") or []
    family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if family is None:
        raise ModelLoadError(path, f"unsupported architecture {archs or cfg.get('model_type')!r} "
                                   f"(supported: {', '.join(HF_ARCHITECTURES)})")
    try:
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        theta, scaling = _rope_settings(cfg)
        sliding_window = cfg.get("sliding_window")
        if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            sliding_window = None
        eos = cfg.get("eos_token_id")
        return ModelConfig(
            architecture=family,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=head_dim,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=(bool(cfg.get("attention_bias", False)) or family == "qwen2"
                      or (family == "qwen2_moe" and bool(cfg.get("qkv_bias", True)))),
            o_bias=bool(cfg.get("attention_bias", False)) and family in ("llama", "qwen3", "qwen3_moe"),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            qk_norm=family in ("qwen3", "qwen3_moe"),
            sliding_window=sliding_window,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            name=cfg.get("_name_or_path", ""),
            **_moe_settings(cfg, family),
        )
    except KeyError as exc:
        raise ModelLoadError(path, f"config.json lacks required field {exc.args[0]!r}") from None
    except InvalidParameterError as exc:
        raise ModelLoadError(path, f"invalid hyper-parameter: {exc}") from None
