"""Whole forward steps in one native call (the CPU fast path), for every family that describes itself.

A model class that can run fused has a `fused_model()` method returning a `FusedModel`: which of
its modules are the token table, the final norm and, per layer, the norms, projections, MLP
activation, rotary table and attention (so Llama, Gemma 3 and GPT-2 describe their own layouts,
and the C++ decoder in `lmserve/quant/csrc/fused_decoder.cpp` runs one layer loop for all).
Mixture-of-experts blocks run as the extension's `MoeFeedForward` (lmserve/quant/csrc/moe_ffn.h).
`build_fused_decoder` hands those weights, norms, rotary tables and KV caches to the decoder once;
the model runner then sends steps through it instead of the PyTorch modules. It applies only
where the two paths compute the same thing: every linear layer held by our block kernel, fp32
activations on the CPU, a KV cache the native attention reads (fp32, bf16, fp16, int8), and not in
deterministic mode (whose contract is that a token's result does not depend on the step it
lands in). When it does not apply, the reason is logged. A model split for tensor parallelism
runs one decoder per rank over its shard, which calls the group's all-reduce between layers.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass

import torch
from torch import nn

from lmserve.config import EngineConfig
from lmserve.layers.activation import Activation, GatedActivation, gelu_tanh
from lmserve.layers.attention import PagedAttention
from lmserve.layers.embedding import VocabEmbedding
from lmserve.layers.linear import Linear
from lmserve.layers.moe import SparseMoeBlock
from lmserve.layers.norm import LayerNorm, RMSNorm
from lmserve.layers.rotary import RotaryEmbedding
from lmserve.quant import native
from lmserve.quant.packed import BlockWeight

logger = logging.getLogger("lmserve")

_NATIVE_KV_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.int8)


@dataclass
class FusedLayer:
    """One decoder layer as the native loop runs it: h += [post_attention_norm](o(attn(qkv(
    input_norm(h))))); h += [post_ffn_norm](down(act(up(pre_ffn_norm(h))))), or with a sparse
    mixture-of-experts block (`moe`, a SparseMoeBlock) in place of up / act / down."""

    input_norm: nn.Module
    qkv: Linear  # q | k | v heads
    attention: PagedAttention
    rotary: RotaryEmbedding | None
    o: Linear
    pre_ffn_norm: nn.Module
    up: Linear | None  # gate | up for gated activations
    activation: nn.Module | None
    down: Linear | None
    moe: SparseMoeBlock | None = None
    q_norm: RMSNorm | None = None
    k_norm: RMSNorm | None = None
    post_attention_norm: nn.Module | None = None
    post_ffn_norm: nn.Module | None = None


@dataclass
class FusedModel:
    embed: VocabEmbedding
    layers: list[FusedLayer]
    final_norm: nn.Module
    embed_scale: float = 1.0
    positions: VocabEmbedding | None = None  # learned absolute positions (GPT-2)


class NotFusable(Exception):
    """Raised by a model's `fused_model()` for a layout the native decoder does not run."""


def _norm(norm: nn.Module) -> tuple[str, torch.Tensor, torch.Tensor | None]:
    if isinstance(norm, LayerNorm):
        return "layer", norm.weight.data.float(), norm.bias.data.float()
    return "rms", _rms_weight(norm), None


def _rms_weight(norm: RMSNorm) -> torch.Tensor:
    """The factor the norm applies after normalising: Gemma's (offset + weight) is formed once
    here, in fp32 as the module does."""
    weight = norm.weight.data.float()
    return weight if norm.weight_offset is None else norm.weight_offset + weight


def _linear(linear: Linear) -> tuple:
    packed = linear.packed
    bias = linear.bias.data.float() if linear.bias is not None else None
    row_parallel = linear.reduce_group is not None
    return packed.q, packed.scale, packed.bias, bias, packed.group, packed.bits, packed.out_features, row_parallel


def activation_name(act: nn.Module) -> str | None:
    """The native decoder's name for an MLP activation module, or None when it has none."""
    if isinstance(act, GatedActivation):
        return {torch.nn.functional.silu: "silu_gated", gelu_tanh: "gelu_tanh_gated"}.get(act.fn)
    if isinstance(act, Activation):
        return "gelu_tanh" if act.fn is gelu_tanh else None
    return None


def _unsupported(model: nn.Module, engine_config: EngineConfig) -> str | None:
    """Why the fused decoder cannot run this model, or None when it can."""
    if not hasattr(model, "fused_model"):
        return f"{type(model).__name__} has no fused layout"
    if engine_config.torch_device.type != "cpu" or engine_config.torch_dtype != torch.float32:
        return "it runs fp32 on the CPU only"
    if engine_config.kv_torch_dtype not in _NATIVE_KV_DTYPES:
        return f"the native attention does not read a {engine_config.kv_cache_dtype} KV cache"
    if engine_config.enforce_eager:
        return "enforce_eager"
    if engine_config.deterministic:
        return "deterministic mode"
    return None


def _unsupported_layout(fused: FusedModel) -> str | None:
    linears = [m for layer in fused.layers for m in (layer.qkv, layer.o, layer.up, layer.down) if m is not None]
    if not all(isinstance(m.packed, BlockWeight) for m in linears):
        return "not every linear layer is block-quantized"
    if fused.embed.packed is not None and not isinstance(fused.embed.packed, BlockWeight):
        return "the token table is not block-quantized"
    if any(activation_name(layer.activation) is None for layer in fused.layers if layer.moe is None):
        return "an MLP activation has no native form"
    return None


class FusedDecoder:
    """The native decoder with the layout it was built from, which maps LoRA adapters onto its
    projections: an adapter's factors are handed to the native code once, as `LoraFactors`."""

    _PROJECTIONS = ("qkv", "o", "up", "down")

    def __init__(self, native_decoder, fused: FusedModel, ext):
        self.native = native_decoder
        self.ext = ext
        self.projections = [[getattr(layer, name) for name in self._PROJECTIONS] for layer in fused.layers]
        self._lora: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # adapter -> LoraFactors or None

    def forward(self, token_ids: torch.Tensor, positions: torch.Tensor, seq_of_row: torch.Tensor,
                block_tables: torch.Tensor, block_size: int, lora_spans=()) -> torch.Tensor:
        """Final-normed hidden states [rows, hidden] of the step's new tokens; `lora_spans`:
        (adapter, first row, end row) for the rows that run an adapter (each `runs_lora`)."""
        spans = [(self._lora[adapter], start, end) for adapter, start, end in lora_spans]
        return self.native.forward(token_ids, positions, seq_of_row, block_tables, block_size, spans)

    def runs_lora(self, adapter) -> bool:
        """Whether every module the adapter changes is a projection of this decoder (not, say, a
        MoE block's shared expert); its factors go to the native code on first use."""
        if adapter not in self._lora:
            keys = {linear.lora_key: (i, j) for i, layer in enumerate(self.projections)
                    for j, linear in enumerate(layer) if linear is not None}
            if set(adapter.weights) <= set(keys):
                factors = [[[] for _ in self._PROJECTIONS] for _ in self.projections]
                for key, (a, b) in adapter.weights.items():
                    i, j = keys[key]
                    factors[i][j] = _lora_blocks(self.projections[i][j], a, b)
                self._lora[adapter] = self.ext.LoraFactors(factors)
            else:
                self._lora[adapter] = None
                logger.info("steps with LoRA adapter %r run through PyTorch modules: it changes modules the fused "
                            "decoder does not hold (%s)", adapter.name, ", ".join(sorted(set(adapter.weights) - set(keys))))
        return self._lora[adapter] is not None


def _lora_blocks(linear: Linear, a: torch.Tensor, b: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor, int]]:
    """An adapter's (A [R, K], B [N, R]) for `linear` as (A, B, first output row) blocks, one per
    shard of a fused projection: the adapter loader stacks the shards' A along the rank and lays
    their B out block-diagonally, so each shard's rows use a run of rank columns and zeros
    elsewhere, which this drops (a shard the adapter leaves alone gives no block)."""
    blocks = []
    for shard in linear.shard_names():
        rows = linear.shard_rows(shard)
        used = (b[rows] != 0).any(dim=0).nonzero().flatten()
        if used.numel() == 0:
            continue
        columns = slice(int(used[0]), int(used[-1]) + 1)
        blocks.append((a[columns], b[rows, columns], rows.start))
    return blocks


def build_fused_decoder(model: nn.Module, engine_config: EngineConfig) -> FusedDecoder | None:
    """The native decoder over the model's weights and bound KV caches, or None (with the reason
    logged) when the model or configuration needs the PyTorch path."""
    ext = native.load()
    reason = "the native extension is unavailable" if ext is None else _unsupported(model, engine_config)
    fused = None
    if reason is None:
        try:
            fused = model.fused_model()
        except NotFusable as exc:
            reason = str(exc)
        else:
            reason = _unsupported_layout(fused)
    if reason is not None:
        logger.info("steps run through PyTorch modules (fused decoder off: %s)", reason)
        return None
    cfg = model.config
    first = fused.layers[0]
    description = dict(heads=first.attention.num_heads, kv_heads=first.attention.num_kv_heads,
                       head_dim=first.attention.head_dim, eps=cfg.rms_norm_eps,
                       embed_scale=float(torch.tensor(fused.embed_scale, dtype=torch.float32)),
                       final_norm=_norm(fused.final_norm), kernel_max_rows=first.qkv.packed.kernel_max_rows,
                       gemm_bf16=first.qkv.packed.gemm_dtype == torch.bfloat16,
                       # under tensor parallelism: this rank's first token id, and the sum across ranks
                       vocab_start=fused.embed.rows.start,
                       all_reduce=fused.embed.tp.all_reduce if fused.embed.tp.size > 1 else None)
    table = fused.embed.packed
    if table is not None:
        description["embed_packed"] = (table.q, table.scale, table.bias, table.group, table.bits, table.out_features)
    else:
        description["embed"] = fused.embed.weight.data.float()
    if fused.positions is not None:
        positions = fused.positions
        description["position_table"] = (positions.packed.dequantize() if positions.packed is not None
                                         else positions.weight.data.float())
    feed_forward = []
    for i, layer in enumerate(fused.layers):
        if layer.moe is None:
            feed_forward.append(dict(up=_linear(layer.up), down=_linear(layer.down),
                                     activation=activation_name(layer.activation)))
            continue
        moe, reason = layer.moe.native_ffn(ext)
        if moe is None:
            logger.info("steps run through PyTorch modules (fused decoder off: layer %d's MoE block: %s)", i, reason)
            return None
        feed_forward.append(dict(moe=moe))
    decoder = ext.FusedDecoder(description)
    for layer, ffn in zip(fused.layers, feed_forward):
        attn = layer.attention
        decoder.add_layer(dict(
            **ffn,
            input_norm=_norm(layer.input_norm), pre_ffn_norm=_norm(layer.pre_ffn_norm),
            post_attention_norm=_norm(layer.post_attention_norm) if layer.post_attention_norm else None,
            post_ffn_norm=_norm(layer.post_ffn_norm) if layer.post_ffn_norm else None,
            q_norm=_rms_weight(layer.q_norm) if layer.q_norm is not None else None,
            k_norm=_rms_weight(layer.k_norm) if layer.k_norm is not None else None,
            qkv=_linear(layer.qkv), o=_linear(layer.o),
            cos=layer.rotary.cos_cache.float() if layer.rotary is not None else None,
            sin=layer.rotary.sin_cache.float() if layer.rotary is not None else None,
            attn_scale=attn.scale, window=attn.sliding_window or 0,
            kv_cache=attn.kv_cache, kv_scales=attn.kv_scales))
    logger.info("steps run fused in native code (%d layers, %s KV cache)", len(fused.layers),
                engine_config.kv_cache_dtype)
    return FusedDecoder(decoder, fused, ext)
