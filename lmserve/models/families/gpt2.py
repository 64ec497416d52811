"""Descriptor of GPT-2 (`models.gpt2`): its config's own key names, biased projections and
Conv1D weights, and llama.cpp's names for its tensors."""

from __future__ import annotations

from lmserve.errors import InvalidParameterError
from lmserve.models.registry import GgufTensorNames, ModelFamily, native_fused_decoder


def _common_keys(cfg: dict) -> dict:
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


_BIASED = dict(qkv_bias=True, o_bias=True, mlp_bias=True)

FAMILIES = [ModelFamily(
    "gpt2", "lmserve.models.gpt2:GPT2LMHeadModel", hf_architectures=("GPT2LMHeadModel",), hf_model_types=("gpt2",),
    tensor_parallel=True, hf_common_keys=_common_keys, fused_decoder=native_fused_decoder,
    config_from_hf=lambda cfg: dict(hidden_act=cfg.get("activation_function") or "gelu_new", conv1d_weights=True,
                                    **_BIASED),
    gguf_architectures=("gpt2",),
    gguf_tensor_names=GgufTensorNames("transformer.h", layer_names={
        "attn_norm": "ln_1", "attn_qkv": "attn.c_attn", "attn_output": "attn.c_proj", "ffn_norm": "ln_2",
        "ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj",
    }, global_names={"token_embd": "transformer.wte", "position_embd": "transformer.wpe",
                     "output_norm": "transformer.ln_f", "output": "lm_head"}),
    config_from_gguf=lambda key, config: dict(hidden_act="gelu_new",
                                              rms_norm_eps=key("attention.layer_norm_epsilon", 1e-5), **_BIASED))]
