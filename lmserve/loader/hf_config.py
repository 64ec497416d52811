"""Translate a Hugging Face `config.json` into a `ModelConfig`."""

from __future__ import annotations

import dataclasses

from lmserve.config import ModelConfig
from lmserve.errors import InvalidParameterError, ModelLoadError

# HF `architectures` entry -> lmserve family key
HF_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "Phi3ForCausalLM": "phi3",
    "Gemma3ForCausalLM": "gemma3",
    "GPT2LMHeadModel": "gpt2",
    "MixtralForCausalLM": "mixtral",
    "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe",
}
# configs without a usable `architectures` entry, by model_type
HF_MODEL_TYPES = {"gemma3_text": "gemma3", "gpt2": "gpt2", "phi3": "phi3"}


def _rope_settings(cfg: dict) -> tuple[float, dict | None]:
    """(rope_theta, scaling dict) from either the old (`rope_theta` + `rope_scaling`) or the new
    (`rope_parameters`) config layout."""
    params = dict(cfg.get("rope_parameters") or cfg.get("rope_scaling") or {})
    theta = params.pop("rope_theta", None) or cfg.get("rope_theta") or 10000.0
    rope_type = params.get("rope_type", params.get("type", "default"))
    rope_type = {"su": "longrope"}.get(rope_type, rope_type)  # Phi-3's early name for LongRoPE
    if rope_type == "default":
        return float(theta), None
    params["rope_type"] = rope_type
    if rope_type in ("llama3", "yarn", "longrope"):
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


def _gpt2_common_keys(cfg: dict) -> dict:
    """GPT-2's config names its hyper-parameters differently; rename them to the common keys."""
    if cfg.get("scale_attn_by_inverse_layer_idx"):
        raise InvalidParameterError("scale_attn_by_inverse_layer_idx", "is not supported (GPT-2 checkpoints "
                                                                       "with it set are not served)")
    renamed = {"hidden_size": cfg["n_embd"], "num_hidden_layers": cfg["n_layer"],
               "num_attention_heads": cfg["n_head"], "max_position_embeddings": cfg["n_positions"],
               "intermediate_size": cfg.get("n_inner") or 4 * cfg["n_embd"],
               "rms_norm_eps": cfg.get("layer_norm_epsilon", 1e-5),
               "tie_word_embeddings": cfg.get("tie_word_embeddings", True)}
    return {**cfg, **renamed}


def _gemma3_settings(cfg: dict) -> dict:
    """Gemma 3's per-layer attention pattern, two RoPE configurations and norm form."""
    for unsupported in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if cfg.get(unsupported):
            raise InvalidParameterError(unsupported, f"is not supported, got {cfg[unsupported]!r}")
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers v5: one RoPE dict per layer type
        global_rope = _rope_settings({**cfg, "rope_parameters": params["full_attention"]})
        local_rope = _rope_settings({**cfg, "rope_parameters": params.get("sliding_attention") or
                                     {"rope_theta": 10000.0}})
    else:
        global_rope = _rope_settings({**cfg, "rope_theta": cfg.get("rope_theta") or 1_000_000.0})
        local_rope = (float(cfg.get("rope_local_base_freq") or 10000.0), None)
    pattern = cfg.get("sliding_window_pattern") or 6
    layer_types = cfg.get("layer_types") or [
        "full_attention" if (i + 1) % pattern == 0 else "sliding_attention" for i in range(cfg["num_hidden_layers"])]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
    return dict(hidden_act=cfg.get("hidden_activation") or cfg.get("hidden_act") or "gelu_pytorch_tanh",
                layer_types=list(layer_types), rope_theta=global_rope[0], rope_scaling=global_rope[1],
                rope_local_theta=local_rope[0], rope_local_scaling=local_rope[1],
                query_pre_attn_scalar=float(cfg.get("query_pre_attn_scalar") or head_dim),
                final_logit_softcapping=cfg.get("final_logit_softcapping"), norm_weight_offset=1.0,
                tie_word_embeddings=True, qk_norm=True, o_bias=bool(cfg.get("attention_bias", False)))


def _family_settings(cfg: dict, family: str) -> dict:
    """ModelConfig fields that differ from the Llama defaults for the non-Llama dense families."""
    if family == "gemma3":
        return _gemma3_settings(cfg)
    if family == "gpt2":
        return dict(hidden_act=cfg.get("activation_function") or "gelu_new", conv1d_weights=True,
                    qkv_bias=True, o_bias=True, mlp_bias=True)
    if family == "phi3":
        factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor") or cfg.get("partial_rotary_factor")
        if factor not in (None, 1, 1.0):
            raise InvalidParameterError("partial_rotary_factor", f"only 1.0 is supported, got {factor!r}")
        return dict(hidden_act=cfg.get("hidden_act") or "silu")
    return {}


def model_config_from_hf(cfg: dict, path: str) -> ModelConfig:
    archs = cfg.get("architectures") or []
    family = next((HF_ARCHITECTURES[a] for a in archs if a in HF_ARCHITECTURES), None)
    if family is None and not archs:
        family = HF_MODEL_TYPES.get(cfg.get("model_type"))
    if family is None:
        raise ModelLoadError(path, f"unsupported architecture {archs or cfg.get('model_type')!r} "
                                   f"(supported: {', '.join(HF_ARCHITECTURES)})")
    try:
        if family == "gpt2":
            cfg = _gpt2_common_keys(cfg)
        num_heads = cfg["num_attention_heads"]
        head_dim = cfg.get("head_dim") or cfg["hidden_size"] // num_heads
        theta, scaling = _rope_settings(cfg)
        sliding_window = cfg.get("sliding_window")
        if family in ("qwen2", "qwen3", "qwen2_moe", "qwen3_moe") and not cfg.get("use_sliding_window", False):
            sliding_window = None
        eos = cfg.get("eos_token_id")
        config = ModelConfig(
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
        return dataclasses.replace(config, **_family_settings(cfg, family))
    except KeyError as exc:
        raise ModelLoadError(path, f"config.json lacks required field {exc.args[0]!r}") from None
    except InvalidParameterError as exc:
        raise ModelLoadError(path, f"invalid hyper-parameter: {exc}") from None
