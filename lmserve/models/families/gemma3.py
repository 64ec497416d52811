"""Descriptor of Gemma 3 text models (`models.gemma3`): its per-layer attention pattern, local
and global RoPE, norm form and chat template, from Hugging Face and llama.cpp configs."""

from __future__ import annotations

import dataclasses

from lmserve.config import ModelConfig
from lmserve.errors import InvalidParameterError
from lmserve.loader.hf_config import rope_settings
from lmserve.models.families.llama import GGUF_TENSOR_NAMES
from lmserve.models.registry import ModelFamily, native_fused_decoder

# The standard Gemma turn format, for files that carry no template (llama.cpp's GGUF). It starts
# without <bos>: the tokenizer adds it when the prompt is encoded.
GEMMA_CHAT_TEMPLATE = (
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\n\n' -%}{%- set messages = messages[1:] -%}"
    "{%- else -%}{%- set system = '' -%}{%- endif -%}"
    "{%- for message in messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{{ (system if loop.first else '') + message['content'] | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _config_from_hf(cfg: dict) -> dict:
    """Gemma 3's per-layer attention pattern, two RoPE configurations and norm form."""
    for unsupported in ("attn_logit_softcapping", "use_bidirectional_attention"):
        if cfg.get(unsupported):
            raise InvalidParameterError(unsupported, f"is not supported, got {cfg[unsupported]!r}")
    params = cfg.get("rope_parameters") or {}
    if "full_attention" in params:  # transformers v5: one RoPE dict per layer type
        global_rope = rope_settings({**cfg, "rope_parameters": params["full_attention"]})
        local_rope = rope_settings({**cfg, "rope_parameters": params.get("sliding_attention") or
                                    {"rope_theta": 10000.0}})
    else:
        global_rope = rope_settings({**cfg, "rope_theta": cfg.get("rope_theta") or 1_000_000.0})
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


def _config_from_gguf(key, config: ModelConfig) -> dict:
    """The same from llama.cpp's metadata, with its built-in values where its files leave them out."""
    pattern = key("attention.sliding_window_pattern", 6)
    num_layers = config.num_layers
    sliding = pattern if isinstance(pattern, list) else [(i + 1) % pattern != 0 for i in range(num_layers)]
    return dict(hidden_act="gelu_pytorch_tanh",
                layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
                rope_local_theta=key("rope.freq_base_swa", 10000.0),
                # llama.cpp: Gemma 3 27B (62 layers) scales queries by hidden/heads, the others by head_dim
                query_pre_attn_scalar=float(config.hidden_size // config.num_heads if num_layers == 62
                                            else config.head_dim),
                final_logit_softcapping=key("final_logit_softcapping"),
                norm_weight_offset=0.0, qk_norm=True)  # llama.cpp's converter stores norms as 1 + w


FAMILIES = [ModelFamily(
    "gemma3", "lmserve.models.gemma3:Gemma3ForCausalLM", hf_architectures=("Gemma3ForCausalLM",),
    hf_model_types=("gemma3_text",), config_from_hf=_config_from_hf, gguf_architectures=("gemma3",),
    config_from_gguf=_config_from_gguf,
    gguf_tensor_names=dataclasses.replace(GGUF_TENSOR_NAMES, layer_names={
        **GGUF_TENSOR_NAMES.layer_names, "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm", "post_ffw_norm": "post_feedforward_layernorm"}),
    chat_template=GEMMA_CHAT_TEMPLATE, fused_decoder=native_fused_decoder)]
