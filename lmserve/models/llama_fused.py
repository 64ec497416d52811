"""Decode-only steps of Llama-family models in one native call (the CPU fast path).

`build_fused_decoder` hands a model's packed weights, norms, rotary tables and KV caches to
the C++ decoder in `lmserve/quant/csrc/llama_decode.cpp` once; the model runner then sends every
step whose sequences each add exactly one token through it instead of the PyTorch modules. It
applies only where the two paths compute the same thing: a Llama-family model (SwiGLU MLP in
every layer, Llama-style RMSNorm) whose linear layers are all held by our block kernel, fp32
activations and an unquantized fp32 KV cache on the CPU, and not in deterministic mode (whose
contract is that a token's result does not depend on the step it lands in).
"""

from __future__ import annotations

import logging

import torch

from lmserve.config import EngineConfig
from lmserve.layers.linear import Linear
from lmserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaMLP
from lmserve.quant import native
from lmserve.quant.packed import BlockWeight

logger = logging.getLogger("lmserve")


def _linear_parts(linear: Linear) -> tuple[list[torch.Tensor], list[int]]:
    packed = linear.packed
    bias = linear.bias.data if linear.bias is not None else torch.empty(0)
    return [packed.q, packed.scale, packed.bias, bias], [packed.group, packed.bits, packed.out_features]


def _unsupported(model: torch.nn.Module, engine_config: EngineConfig) -> str | None:
    """Why the fused decoder cannot run this model, or None when it can."""
    if not isinstance(model, LlamaForCausalLM):
        return f"{type(model).__name__} is not a Llama-family model"
    if engine_config.torch_device.type != "cpu" or engine_config.torch_dtype != torch.float32:
        return "it runs fp32 on the CPU only"
    if engine_config.kv_quantized or engine_config.kv_torch_dtype != torch.float32:
        return "the KV cache is not fp32"
    if engine_config.enforce_eager:
        return "enforce_eager"
    if engine_config.deterministic:
        return "deterministic mode"
    if model.model.embed_tokens.tp.size > 1:
        return "the model is split for tensor parallelism (the fused decoder runs whole models)"
    layers = model.model.layers
    if not all(isinstance(layer, LlamaDecoderLayer) and isinstance(layer.mlp, LlamaMLP) for layer in layers):
        return "not every layer is a Llama decoder layer with a SwiGLU MLP"
    norms = [model.model.norm] + [n for layer in layers for n in (layer.input_layernorm, layer.post_attention_layernorm)]
    if any(norm.weight_offset is not None for norm in norms):
        return "offset RMSNorm"
    linears = [m for layer in layers for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                               layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    if not all(isinstance(m.packed, BlockWeight) for m in linears):
        return "not every linear layer is block-quantized"
    if model.model.embed_tokens.packed is not None and not isinstance(model.model.embed_tokens.packed, BlockWeight):
        return "the token table is not block-quantized"
    if model.config.hidden_act != "silu":
        return f"activation {model.config.hidden_act}"
    return None


def build_fused_decoder(model: torch.nn.Module, engine_config: EngineConfig):
    """The native decoder over the model's weights and bound KV caches, or None (with the reason
    logged) when the model or configuration needs the PyTorch path. Its `forward(token_ids,
    positions, block_tables, block_size)` returns the final-normed hidden states [B, hidden] of
    one new token per sequence."""
    ext = native.load()
    reason = "the native extension is unavailable" if ext is None else _unsupported(model, engine_config)
    if reason is not None:
        logger.info("decode steps run through PyTorch modules (fused decode off: %s)", reason)
        return None
    cfg = model.config
    attn0 = model.model.layers[0].self_attn.attn
    empty = torch.empty(0)
    table = model.model.embed_tokens.packed
    if table is not None:
        embed, embed_format = [table.q, table.scale, table.bias], [table.group, table.bits, table.out_features]
    else:
        embed, embed_format = [model.model.embed_tokens.weight.data.float().contiguous()], []
    decoder = ext.LlamaDecoder(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, attn0.scale,
                               model.rotary.cos_cache.float(), model.rotary.sin_cache.float(), embed, embed_format,
                               model.model.norm.weight.data)
    for layer in model.model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        parts = [_linear_parts(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        decoder.add_layer(layer.input_layernorm.weight.data, layer.post_attention_layernorm.weight.data,
                          attn.q_norm.weight.data if attn.qk_norm else empty,
                          attn.k_norm.weight.data if attn.qk_norm else empty,
                          *[tensors for tensors, _ in parts], [f for _, formats in parts for f in formats],
                          attn.attn.kv_cache, attn.attn.sliding_window or 0)
    logger.info("decode steps run fused in native code (%d layers)", len(model.model.layers))
    return decoder
