"""Descriptors of the families on the Llama decoder (`models.llama`): Llama 2/3 and SmolLM2,
Mistral, Qwen2, Qwen3 and Phi-3, each a set of ModelConfig flags on the common reading."""

from __future__ import annotations

import dataclasses

from lmserve.config import ModelConfig
from lmserve.errors import InvalidParameterError
from lmserve.models.registry import GgufTensorNames, ModelFamily, native_fused_decoder

# llama.cpp's names for the Llama layout, with its mixture-of-experts tensors: router, experts
# stacked [E, ...], shared expert and its gate.
GGUF_TENSOR_NAMES = GgufTensorNames("model.layers", layer_names={
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.gate_proj", "ffn_up_exps": "mlp.experts.up_proj",
    "ffn_down_exps": "mlp.experts.down_proj", "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj", "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
}, global_names={"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"})


def attention_bias(cfg: dict) -> dict:
    """Llama's `attention_bias`, which biases the output projection too."""
    return {"o_bias": bool(cfg.get("attention_bias", False))}


def qwen_sliding_window(cfg: dict) -> dict:
    """Qwen configs carry a `sliding_window` that applies only with `use_sliding_window`."""
    return {} if cfg.get("use_sliding_window", False) else {"sliding_window": None}


def _llama_from_gguf(key, config: ModelConfig) -> dict:
    """llama.cpp writes Mixtral as a `llama` file with expert tensors."""
    return {"architecture": "mixtral"} if config.num_experts else {}


def _phi3_from_hf(cfg: dict) -> dict:
    factor = (cfg.get("rope_parameters") or {}).get("partial_rotary_factor") or cfg.get("partial_rotary_factor")
    if factor not in (None, 1, 1.0):
        raise InvalidParameterError("partial_rotary_factor", f"only 1.0 is supported, got {factor!r}")
    return {"hidden_act": cfg.get("hidden_act") or "silu"}


def llama_family(architecture: str, hf_architecture: str, gguf_architecture: str | None = None,
                 model_class_path: str = "lmserve.models.llama:LlamaForCausalLM", **fields) -> ModelFamily:
    """The descriptor of a family on the Llama decoder: llama.cpp's Llama tensor names and the
    fused native decode step unless `fields` say otherwise."""
    return ModelFamily(architecture, model_class_path, hf_architectures=(hf_architecture,),
                       gguf_architectures=(gguf_architecture,) if gguf_architecture else (),
                       **{"gguf_tensor_names": GGUF_TENSOR_NAMES, "fused_decoder": native_fused_decoder,
                          "tensor_parallel": True, **fields})


FAMILIES = [
    llama_family("llama", "LlamaForCausalLM", "llama", config_from_hf=attention_bias, gguf_qk_interleaved=True,
                 quantize_gguf_arch="llama", config_from_gguf=_llama_from_gguf,
                 # a Mixtral file that does not say renormalises the top-k weights, as llama.cpp does
                 gguf_metadata_defaults={"expert_weights_norm": True}),
    llama_family("mistral", "MistralForCausalLM", "mistral", quantize_gguf_arch="llama"),
    llama_family("qwen2", "Qwen2ForCausalLM", "qwen2", quantize_gguf_arch="qwen2",
                 config_from_hf=lambda cfg: {"qkv_bias": True, **qwen_sliding_window(cfg)}),
    llama_family("qwen3", "Qwen3ForCausalLM", "qwen3", quantize_gguf_arch="qwen3",
                 config_from_hf=lambda cfg: {**attention_bias(cfg), "qk_norm": True, **qwen_sliding_window(cfg)}),
    llama_family("phi3", "Phi3ForCausalLM", "phi3", hf_model_types=("phi3",), config_from_hf=_phi3_from_hf,
                 gguf_tensor_names=dataclasses.replace(GGUF_TENSOR_NAMES, layer_names={
                     **GGUF_TENSOR_NAMES.layer_names, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"})),
]
