"""GGUF checkpoints: hyper-parameters and tokenizer from the metadata, tensors decoded by
`quant.gguf_blocks` (or dequantized by the `gguf` package) and renamed to the Hugging Face names
the models use. What differs between families (tensor names, metadata, q/k layout) comes from
their descriptors in `lmserve.models.registry`. The file is read by `gguf_layout.read_gguf`, which
checks its layout as it reads; before anything is built from it, the kinds of its metadata values
and their agreement with its tensors (`sanity`) are checked."""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from pathlib import Path

import numpy as np

from lmserve.config import ModelConfig
from lmserve.errors import InvalidParameterError, ModelLoadError
from lmserve.loader.checkpoint import Checkpoint
from lmserve.loader.gguf_layout import GGUFFile, GGUFTensor, TensorSpan, read_gguf
from lmserve.loader.sanity import check_layers, check_shapes, check_token_ids
from lmserve.models import registry
from lmserve.quant.gguf_blocks import PACKABLE_TYPES, decode

# Tensor types the gguf package can dequantize and we accept.
SUPPORTED_TYPES = {"F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K",
                   "Q4_K", "Q5_K", "Q6_K", "IQ4_NL", "IQ4_XS"}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(\w+)\.(weight|bias)$")
_LAYER_RE = re.compile(r"^blk\.(\d{1,18})\.")  # longer numbers name no layer the model has
# Mixtral files written before llama.cpp stacked the experts: blk.N.ffn_gate.E.weight
_PER_EXPERT_RE = re.compile(r"^blk\.(\d+)\.ffn_(gate|up|down)\.(\d+)\.weight$")


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str | None:
    """Map a GGUF tensor name of architecture `arch` to its Hugging Face name (None for tensors
    the model does not use)."""
    names = registry.family_for_gguf(arch).gguf_tensor_names
    match = _BLOCK_RE.match(gguf_name)
    if match:
        layer, kind, suffix = match.groups()
        mapped = names.layer_names.get(kind)
        return f"{names.layer_prefix}.{layer}.{mapped}.{suffix}" if mapped else None
    match = _PER_EXPERT_RE.match(gguf_name)
    if match:
        layer, proj, expert = match.groups()
        return f"model.layers.{layer}.mlp.experts.{expert}.{proj}_proj.weight"
    base, _, suffix = gguf_name.rpartition(".")
    mapped = names.global_names.get(base)
    return f"{mapped}.{suffix}" if mapped else None


def _unpermute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves the rotary halves of Llama q/k rows; undo it so the
    rotate-half RoPE of the Hugging Face layout applies."""
    rows = weight.shape[0]
    grouped = weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def _moe_settings(key: registry.GgufKey, num_layers: int, tensor_names: set[str]) -> dict:
    """ModelConfig's mixture-of-experts fields; a layer without a router has a dense MLP."""
    if not key("expert_count"):
        return {}
    return dict(
        num_experts=key("expert_count"),
        num_experts_per_tok=key("expert_used_count", required=True),
        moe_intermediate_size=key("expert_feed_forward_length") or key("feed_forward_length", required=True),
        shared_expert_intermediate_size=key("expert_shared_feed_forward_length", 0),
        norm_topk_prob=bool(key("expert_weights_norm", False)),
        mlp_only_layers=[i for i in range(num_layers) if f"blk.{i}.ffn_gate_inp.weight" not in tensor_names],
    )


def _longrope_scaling(gguf_file: GGUFFile, meta: dict, config: ModelConfig, path: Path) -> dict:
    """Phi-3's long-RoPE parameters; llama.cpp keeps the two factor lists as tensors, F32 with one
    factor per rotary frequency."""
    factors = {t.name: np.asarray(t.data, dtype=np.float32).tolist() for t in gguf_file.tensors
               if t.name in ("rope_factors_long.weight", "rope_factors_short.weight")
               and t.tensor_type.name == "F32" and t.n_elements == config.head_dim // 2}
    if len(factors) != 2:
        raise ModelLoadError(path, f"long-RoPE needs F32 tensors 'rope_factors_long.weight' and "
                                   f"'rope_factors_short.weight' of head_dim / 2 = {config.head_dim // 2} factors")
    scaling = {"rope_type": "longrope", "long_factor": factors["rope_factors_long.weight"],
               "short_factor": factors["rope_factors_short.weight"],
               "original_max_position_embeddings": meta.get("phi3.rope.scaling.original_context_length",
                                                            config.max_position_embeddings)}
    if meta.get("phi3.rope.scaling.attn_factor") is not None:
        scaling["attention_factor"] = meta["phi3.rope.scaling.attn_factor"]
    return scaling


def _config_from_metadata(meta: dict, family: registry.ModelFamily, tensor_names: set[str], path: str) -> ModelConfig:
    """The keys every family shares, read here; the family's descriptor supplies the fields that differ."""
    arch = meta.get("general.architecture")

    def key(name, default=None, required=False):
        full = f"{arch}.{name}"
        if required and full not in meta:
            raise ModelLoadError(path, f"GGUF metadata lacks {full!r}")
        return meta.get(full, family.gguf_metadata_defaults.get(name, default))

    hidden = key("embedding_length", required=True)
    num_heads = key("attention.head_count", required=True)
    num_kv = key("attention.head_count_kv", num_heads)
    head_dim = key("attention.key_length") or key("rope.dimension_count") or hidden // num_heads
    vocab = key("vocab_size") or len(meta.get("tokenizer.ggml.tokens", []))
    scaling = None
    scaling_type = key("rope.scaling.type")
    if scaling_type and scaling_type != "none":
        scaling = {"rope_type": scaling_type, "factor": key("rope.scaling.factor", 1.0)}
        if key("rope.scaling.original_context_length"):
            scaling["original_max_position_embeddings"] = key("rope.scaling.original_context_length")
    eos = meta.get("tokenizer.ggml.eos_token_id")
    num_layers = key("block_count", required=True)
    layer_of = {name: int(match[1]) for name in tensor_names if (match := _LAYER_RE.match(name))}
    check_layers(path, f"{arch}.block_count", num_layers, layer_of, "blk.{}.*")
    config = ModelConfig(
        architecture=family.architecture,
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=key("feed_forward_length", required=True),
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv,
        head_dim=head_dim,
        max_position_embeddings=key("context_length", 2048),
        rms_norm_eps=key("attention.layer_norm_rms_epsilon", 1e-6),
        rope_theta=key("rope.freq_base", 10000.0),
        rope_scaling=scaling,
        tie_word_embeddings="output.weight" not in tensor_names,
        qkv_bias="blk.0.attn_q.bias" in tensor_names,
        o_bias="blk.0.attn_output.bias" in tensor_names,
        qk_norm="blk.0.attn_q_norm.weight" in tensor_names,
        sliding_window=key("attention.sliding_window"),
        bos_token_id=meta.get("tokenizer.ggml.bos_token_id"),
        eos_token_ids=[eos] if eos is not None else [],
        name=meta.get("general.name", ""),
        **_moe_settings(key, num_layers, tensor_names),
    )
    if family.config_from_gguf is None:
        return config
    return dataclasses.replace(config, **family.config_from_gguf(key, config))


def _check_against_tensors(config: ModelConfig, meta: dict, spans: list[TensorSpan], path: Path) -> None:
    """The shapes the config gives the weights it sizes, and the special token ids, against the file."""
    weights = []
    for span in spans:
        match = _BLOCK_RE.match(span.name)
        kind, suffix = (match[2], match[3]) if match else span.name.rpartition(".")[::2]
        if suffix == "weight":
            weights.append((span.name, kind, span.dims[::-1]))  # GGUF lists dimensions innermost first
    check_shapes(path, config, weights)
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = min(config.vocab_size, len(tokens)) if tokens else config.vocab_size
    check_token_ids(path, {f"tokenizer.ggml.{name}_token_id": meta.get(f"tokenizer.ggml.{name}_token_id")
                           for name in ("bos", "eos", "padding")}, vocab)
    if registry.family(config.architecture).gguf_qk_interleaved and config.head_dim % 2:
        raise ModelLoadError(path, f"head_dim is {config.head_dim}; rotary embeddings need an even head_dim")


def _dequantize(tensor: GGUFTensor) -> np.ndarray:
    """A tensor that is not kept packed, as floats in gguf-py's [outermost, ..., innermost] shape."""
    if tensor.tensor_type.name in ("F32", "F16"):
        return tensor.data
    from gguf.quants import dequantize

    return dequantize(tensor.data, tensor.tensor_type)


def load_gguf(path: Path) -> Checkpoint:
    from lmserve.loader.gguf_metadata import check_metadata_types
    from lmserve.tokenizer import Tokenizer

    gguf_file = read_gguf(path)
    meta = gguf_file.metadata
    check_metadata_types(meta, path)
    types = Counter(t.tensor_type.name for t in gguf_file.tensors)
    unsupported = sorted(set(types) - SUPPORTED_TYPES)
    if unsupported:
        raise ModelLoadError(path, f"unsupported tensor type(s) {', '.join(unsupported)} "
                                   f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})")
    names = {t.name for t in gguf_file.tensors}
    arch = meta.get("general.architecture")
    try:
        family = registry.family_for_gguf(arch)
        config = _config_from_metadata(meta, family, names, str(path))
    except registry.UnsupportedArchitectureError as exc:
        raise ModelLoadError(path, str(exc)) from None
    except InvalidParameterError as exc:
        raise ModelLoadError(path, f"invalid hyper-parameter in GGUF metadata: {exc}") from None
    _check_against_tensors(config, meta, gguf_file.tensors, path)
    if "rope_factors_long.weight" in names:
        config = dataclasses.replace(config, rope_scaling=_longrope_scaling(gguf_file, meta, config, path))
    rope_heads = {"q_proj": config.num_heads, "k_proj": config.num_kv_heads} if family.gguf_qk_interleaved else {}

    tensors = gguf_file.tensors  # not the file's metadata: the token lists are dropped once the tokenizer is built

    def iter_tensors(keep_packed: bool = False):
        import torch  # here, not at the top: reading a file's metadata (`lmserve info`) needs no PyTorch

        for tensor in tensors:
            name = hf_tensor_name(tensor.name, arch)
            if name is None:
                continue
            proj = name.split(".")[-2]
            type_name = tensor.tensor_type.name
            if keep_packed and type_name in PACKABLE_TYPES and (len(tensor.dims) == 2 or ".experts." in name):
                # GGUF lists dimensions innermost first: dims is (cols, rows) or (cols, rows, experts)
                packed = decode(tensor.data, type_name, tuple(reversed(tensor.dims)))
                if proj in rope_heads:
                    packed = packed.map_rows(lambda rows: _unpermute_rope(rows, rope_heads[proj]))
                yield name, packed
                tensor.release()
                continue
            try:
                array = _dequantize(tensor)
            except Exception as exc:
                raise ModelLoadError(path, f"cannot decode tensor {tensor.name!r} "
                                           f"({type_name}): {exc}") from None
            if proj in rope_heads:
                array = _unpermute_rope(array, rope_heads[proj])
            array = np.ascontiguousarray(array, dtype=np.float32)
            if not array.flags.writeable:  # F32 tensors come straight from the read-only memory map
                array = array.copy()
            yield name, torch.from_numpy(array)
            tensor.release()

    tokenizer = Tokenizer.from_gguf_metadata(meta, str(path))
    if tokenizer.chat_template is None:
        tokenizer.chat_template = registry.family(config.architecture).chat_template
    return Checkpoint(path=str(path), format="gguf", config=config, tokenizer=tokenizer,
                      tensor_types=dict(types), num_params=sum(t.n_elements for t in gguf_file.tensors),
                      _iter_tensors=iter_tensors)
