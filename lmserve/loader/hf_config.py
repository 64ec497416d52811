"""Translate a Hugging Face `config.json` into a `ModelConfig`: the keys every family shares are
read here; the family's descriptor (`lmserve.models.registry`) renames its own keys first and
supplies the fields that differ. Sizes must be positive integers and special token ids must lie
in the vocabulary, or the config is refused naming the key."""

from __future__ import annotations

import dataclasses

from lmserve.config import ModelConfig
from lmserve.errors import InvalidParameterError, ModelLoadError
from lmserve.loader.sanity import check_token_ids
from lmserve.models.registry import UnsupportedArchitectureError, family_for_hf

# Sizes read (after a family's renames) that must be positive integers where given.
_SIZE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "head_dim", "max_position_embeddings")


def rope_settings(cfg: dict) -> tuple[float, dict | None]:
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


def _check_sizes(cfg: dict, path: str) -> None:
    for key in _SIZE_KEYS:
        value = cfg.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            raise ModelLoadError(path, f"{key} must be a positive integer, got {value!r:.80}")


def model_config_from_hf(cfg: dict, path: str) -> ModelConfig:
    if not isinstance(cfg, dict):
        raise ModelLoadError(path, "config.json is not a JSON object")
    architectures, model_type = cfg.get("architectures") or [], cfg.get("model_type")
    if not isinstance(architectures, list) or not all(isinstance(name, str) for name in architectures):
        raise ModelLoadError(path, f"architectures must be a list of names, got {architectures!r:.80}")
    if model_type is not None and not isinstance(model_type, str):
        raise ModelLoadError(path, f"model_type must be a name, got {model_type!r:.80}")
    try:
        family = family_for_hf(architectures, model_type)
    except UnsupportedArchitectureError as exc:
        raise ModelLoadError(path, str(exc)) from None
    try:
        if family.hf_common_keys is not None:
            cfg = family.hf_common_keys(cfg)
        _check_sizes(cfg, path)
        num_heads = cfg["num_attention_heads"]
        theta, scaling = rope_settings(cfg)
        eos = cfg.get("eos_token_id")
        if eos is not None and not isinstance(eos, (int, list)):
            raise ModelLoadError(path, f"eos_token_id must be a token id or a list of them, got {eos!r:.80}")
        config = ModelConfig(
            architecture=family.architecture,
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=cfg.get("num_key_value_heads") or num_heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // num_heads,
            max_position_embeddings=cfg.get("max_position_embeddings", 2048),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            sliding_window=cfg.get("sliding_window"),
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=[eos] if isinstance(eos, int) else list(eos or []),
            name=cfg.get("_name_or_path", ""),
        )
        if family.config_from_hf is not None:
            config = dataclasses.replace(config, **family.config_from_hf(cfg))
        check_token_ids(path, {"bos_token_id": config.bos_token_id, "pad_token_id": cfg.get("pad_token_id"),
                               **{"eos_token_id" if isinstance(eos, int) else f"eos_token_id[{i}]": token
                                  for i, token in enumerate(config.eos_token_ids)}}, config.vocab_size)
        return config
    except KeyError as exc:
        raise ModelLoadError(path, f"config.json lacks required field {exc.args[0]!r}") from None
    except InvalidParameterError as exc:
        raise ModelLoadError(path, f"invalid hyper-parameter: {exc}") from None
