"""`lmserve quantize`: write a GGUF file whose weight matrices are quantized to one GGML type.

The input is a GGUF file (its metadata is copied as is) or a Hugging Face safetensors directory
of a family whose descriptor names a `quantize_gguf_arch` (metadata built from the config and
tokenizer the way llama.cpp's converter writes it: llama.cpp tensor names, Llama q/k rows permuted
to llama.cpp's interleaved rotary layout, a mixture of experts' projections stacked [E, rows, cols]
per layer, byte-level BPE vocabulary). Tensors of two or more dimensions are quantized along their
rows; 1-D tensors (norms, biases) and MoE routers are stored F32, as llama.cpp's quantize keeps
them. A matrix whose rows do not divide into the type's blocks falls back as llama.cpp's quantize
does (Q4_K to Q5_0 for rows a multiple of 32), else to F16, with a log line.

gguf-py quantizes Q8_0, Q4_0, Q4_1 and Q5_0; it has no Q4_K quantizer, so :func:`quantize_q4_k`
implements one (a per-sub-block min/max fit).
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.quants import dequantize, quantize

from lmserve.errors import InvalidParameterError, ModelLoadError
from lmserve.models import registry

logger = logging.getLogger("lmserve")

QUANT_TYPE_NAMES = ("q4_k", "q8_0", "q4_0", "q4_1", "q5_0", "f16", "f32")  # f16/f32: dequantized copies

QK_K = 256  # elements in a k-quant super-block
_Q4_K_SUB = 32  # elements in one of its 8 sub-blocks


# ---- Q4_K ----------------------------------------------------------------------------------

def _fp16_at_least(values: np.ndarray) -> np.ndarray:
    """`values` rounded to float16, upwards, so that a scale never shrinks below what it must cover."""
    rounded = values.astype(np.float16)
    return np.where(rounded.astype(np.float32) < values, np.nextafter(rounded, np.float16(np.inf)), rounded)


def quantize_q4_k(array: np.ndarray) -> np.ndarray:
    """Pack float rows (length a multiple of 256) into Q4_K blocks: per super-block fp16 `d` and
    `dmin`, eight 6-bit sub-block scales and mins (12 bytes) and 128 bytes of 4-bit values, with
    x ~= d * scale_j * q - dmin * min_j. Returns uint8 [..., row_length / 256 * 144]."""
    x = np.asarray(array, dtype=np.float32)
    if x.shape[-1] % QK_K:
        raise InvalidParameterError("array", f"Q4_K rows must be a multiple of {QK_K} long, got {x.shape[-1]}")
    blocks = x.reshape(-1, QK_K // _Q4_K_SUB, _Q4_K_SUB)
    offset = -np.minimum(blocks.min(-1), 0.0)  # what each sub-block must be lifted by to be >= 0
    dmin = _fp16_at_least(offset.max(-1) / 63)
    dmin32 = dmin.astype(np.float32)[:, None]
    mins = np.ceil(np.divide(offset, dmin32, out=np.zeros_like(offset), where=dmin32 > 0))
    mins = np.clip(mins, 0, 63)
    lifted_max = blocks.max(-1) + dmin32 * mins
    needed_step = lifted_max / 15
    d = _fp16_at_least(needed_step.max(-1) / 63)
    d32 = d.astype(np.float32)[:, None]
    scales = np.clip(np.ceil(np.divide(needed_step, d32, out=np.zeros_like(needed_step), where=d32 > 0)), 0, 63)
    step = (d32 * scales)[..., None]
    lifted = blocks + (dmin32 * mins)[..., None]
    q = np.clip(np.rint(np.divide(lifted, step, out=np.zeros_like(lifted), where=step > 0)), 0, 15).astype(np.uint8)

    sc, mn = scales.astype(np.uint8), mins.astype(np.uint8)
    # 6-bit scales/mins of sub-blocks 0-3 in the low bits of bytes 0-3 / 4-7; those of sub-blocks
    # 4-7 split into low nibbles (bytes 8-11) and two high bits (top of bytes 0-3 / 4-7).
    packed_scales = np.concatenate([
        (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
        (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
        (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
    ], axis=1)
    # Each 32-byte chunk holds sub-block 2c in its low nibbles and sub-block 2c + 1 in its high ones.
    pairs = q.reshape(-1, 4, 2, _Q4_K_SUB)
    nibbles = (pairs[:, :, 0] | (pairs[:, :, 1] << 4)).reshape(-1, QK_K // 2)
    packed = np.concatenate([d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8),
                             packed_scales, nibbles], axis=1)
    return packed.reshape(*x.shape[:-1], x.shape[-1] // QK_K * packed.shape[1])


# ---- tensor types --------------------------------------------------------------------------

def quant_type(name: str):
    """The GGMLQuantizationType for a `--type` value."""
    if name not in QUANT_TYPE_NAMES:
        raise InvalidParameterError("type", f"must be one of {', '.join(QUANT_TYPE_NAMES)}; got {name!r}")
    return gguf.GGMLQuantizationType[name.upper()]


# What llama.cpp's quantize stores a tensor in when its rows do not divide into the type's blocks.
_FALLBACK = {gguf.GGMLQuantizationType.Q4_K: gguf.GGMLQuantizationType.Q5_0}


def storage_type(name: str, shape: tuple[int, ...], qtype):
    """The type a tensor is written in: F32 for 1-D tensors and MoE routers (`ffn_gate_inp`),
    else `qtype` when its rows divide into the type's blocks, else llama.cpp's fallback (Q5_0 for
    Q4_K), else F16."""
    Q = gguf.GGMLQuantizationType
    if len(shape) < 2 or name.endswith("ffn_gate_inp.weight"):
        return Q.F32
    row = shape[-1]
    for candidate in (qtype, _FALLBACK.get(qtype)):
        if candidate is not None and row % gguf.GGML_QUANT_SIZES[candidate][0] == 0:
            if candidate != qtype:
                logger.info("%s: rows of %d are not a multiple of %s's block of %d; stored as %s", name, row,
                            qtype.name, gguf.GGML_QUANT_SIZES[qtype][0], candidate.name)
            return candidate
    logger.info("%s: rows of %d fit no %s block; stored as F16", name, row, qtype.name)
    return Q.F16


def pack(array: np.ndarray, qtype) -> np.ndarray:
    """`array` (float32) in `qtype`'s storage: packed blocks, or the plain float array."""
    if qtype == gguf.GGMLQuantizationType.Q4_K:
        return quantize_q4_k(array)
    return quantize(np.ascontiguousarray(array, dtype=np.float32), qtype)

_FILE_TYPES = {"q4_k": "MOSTLY_Q4_K_S", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0", "q4_1": "MOSTLY_Q4_1",
               "q5_0": "MOSTLY_Q5_0", "f16": "MOSTLY_F16", "f32": "ALL_F32"}


# ---- sources -------------------------------------------------------------------------------

@dataclass
class _Source:
    arch: str  # GGUF general.architecture
    write_metadata: Callable  # (GGUFWriter) -> None, everything but the architecture and file type
    tensors: Callable[[], Iterator[tuple[str, np.ndarray]]]  # llama.cpp name, float32 array


def _gguf_source(path: Path) -> _Source:
    from lmserve.loader.gguf_layout import read_gguf

    source = read_gguf(path)  # counts, offsets and sizes checked as it reads
    meta = source.metadata
    skipped = {"general.architecture", "general.file_type", "general.quantization_version"}

    def write_metadata(writer):
        for key, value in meta.items():
            if key.startswith("GGUF.") or key in skipped:
                continue
            value_type, sub_type = source.value_types[key]
            writer.add_key_value(key, value, value_type, sub_type=sub_type)

    def tensors():
        for tensor in source.tensors:
            try:
                array = dequantize(tensor.data, tensor.tensor_type)
            except Exception as exc:
                raise ModelLoadError(path, f"cannot decode tensor {tensor.name!r} "
                                           f"({tensor.tensor_type.name}): {exc}") from None
            yield tensor.name, np.asarray(array, dtype=np.float32)

    return _Source(str(meta.get("general.architecture")), write_metadata, tensors)


_CONVERT_HINT = "convert the directory with llama.cpp's convert_hf_to_gguf.py and quantize that GGUF file"


def _permute_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's layout of Llama q/k rows: each head's rotary halves interleaved pairwise
    (the inverse of the un-permutation in lmserve.loader.gguf)."""
    rows = weight.shape[0]
    grouped = weight.reshape(n_heads, 2, rows // n_heads // 2, *weight.shape[1:])
    return grouped.swapaxes(1, 2).reshape(weight.shape)


def _hf_source(directory: Path) -> _Source:
    from lmserve.loader.safetensors import load_hf_directory

    checkpoint = load_hf_directory(directory)
    cfg = checkpoint.config
    arch = registry.family(cfg.architecture).quantize_gguf_arch
    if arch is None:
        supported = [family.architecture for family in registry.families() if family.quantize_gguf_arch]
        raise ModelLoadError(directory, f"quantize cannot convert architecture {cfg.architecture!r} "
                                        f"(supported: {', '.join(supported)})")
    scaling = (cfg.rope_scaling or {}).get("rope_type")
    if scaling not in (None, "default", "linear", "yarn"):
        raise ModelLoadError(directory, f"quantize cannot write {scaling!r} rope scaling from a Hugging Face "
                                        f"directory; {_CONVERT_HINT}")
    if cfg.num_experts:
        _check_moe_graph(cfg, arch, directory)
    tokenizer_meta = _byte_level_vocab(directory, cfg.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], cfg.num_layers)
    rope_heads = ({"q_proj": cfg.num_heads, "k_proj": cfg.num_kv_heads}
                  if registry.family_for_gguf(arch).gguf_qk_interleaved else {})

    def write_metadata(writer):
        writer.add_name(cfg.name or directory.name)
        for add, value in ((writer.add_context_length, cfg.max_position_embeddings),
                           (writer.add_embedding_length, cfg.hidden_size),
                           (writer.add_feed_forward_length, cfg.intermediate_size),
                           (writer.add_block_count, cfg.num_layers), (writer.add_head_count, cfg.num_heads),
                           (writer.add_head_count_kv, cfg.num_kv_heads), (writer.add_key_length, cfg.head_dim),
                           (writer.add_value_length, cfg.head_dim), (writer.add_rope_dimension_count, cfg.head_dim),
                           (writer.add_rope_freq_base, cfg.rope_theta),
                           (writer.add_layer_norm_rms_eps, cfg.rms_norm_eps), (writer.add_vocab_size, cfg.vocab_size)):
            add(value)
        if cfg.sliding_window:
            writer.add_sliding_window(cfg.sliding_window)
        if cfg.num_experts:
            writer.add_expert_count(cfg.num_experts)
            writer.add_expert_used_count(cfg.num_experts_per_tok)
            writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
        if scaling in ("linear", "yarn"):
            writer.add_rope_scaling_type(gguf.RopeScalingType[scaling.upper()])
            writer.add_rope_scaling_factor(cfg.rope_scaling["factor"])
            if cfg.rope_scaling.get("original_max_position_embeddings"):
                writer.add_rope_scaling_orig_ctx_len(cfg.rope_scaling["original_max_position_embeddings"])
        tokenizer_meta(writer)

    def arrays():
        for hf_name, tensor in checkpoint.tensors():
            if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd for a tied head
            yield hf_name, tensor.float().numpy()

    def tensors():
        for hf_name, array in _stacked_experts(arrays(), cfg.num_experts, directory):
            name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
            if name is None:
                logger.info("%s: not a tensor llama.cpp uses; skipped", hf_name)
                continue
            proj = hf_name.split(".")[-2]
            if proj in rope_heads:
                array = _permute_rope(array, rope_heads[proj])
            yield name, array

    return _Source(arch, write_metadata, tensors)


def _check_moe_graph(cfg, arch: str, directory: Path) -> None:
    """Refuse a mixture of experts that llama.cpp's graph for `arch` would compute differently:
    its qwen3moe graph has a router in every layer, no shared expert, and always renormalises the
    top-k routing weights."""
    differences = [what for what, present in (
        ("dense layers (mlp_only_layers, decoder_sparse_step)",
         not all(cfg.is_moe_layer(layer) for layer in range(cfg.num_layers))),
        ("a shared expert", cfg.shared_expert_intermediate_size),
        ("top-k weights that are not renormalised (norm_topk_prob false)", not cfg.norm_topk_prob)) if present]
    if differences:
        raise ModelLoadError(directory, f"llama.cpp's {arch} graph cannot run this mixture of experts: it has "
                                        f"{', '.join(differences)}")


_PER_EXPERT = re.compile(r"^(.+\.experts)\.(\d+)\.(\w+)\.weight$")


def _stacked_experts(arrays: Iterator[tuple[str, np.ndarray]], num_experts: int,
                     directory: Path) -> Iterator[tuple[str, np.ndarray]]:
    """(name, array) pairs of a checkpoint with each layer's experts as llama.cpp stores them,
    `<layer>.mlp.experts.<proj>.weight` [E, rows, cols]: stacked from one tensor per expert
    (`experts.<e>.<proj>.weight`, as save_pretrained writes them), or transformers v5's fused
    `experts.gate_up_proj` [E, 2 * I, H] split into gate and up. Other tensors pass through."""
    pending: dict[str, dict[int, np.ndarray]] = {}
    for name, array in arrays:
        if match := _PER_EXPERT.match(name):
            prefix, expert, proj = match[1], int(match[2]), match[3]
            if expert >= num_experts:
                raise ModelLoadError(directory, f"{name}: expert {expert} of a model with {num_experts}")
            stacked = f"{prefix}.{proj}.weight"
            parts = pending.setdefault(stacked, {})
            parts[expert] = array
            if len(parts) == num_experts:
                yield stacked, np.stack([parts[e] for e in range(num_experts)])
                del pending[stacked]
        elif name.endswith(".experts.gate_up_proj"):
            prefix = name.removesuffix("gate_up_proj")
            gate, up = np.split(array, 2, axis=1)
            yield f"{prefix}gate_proj.weight", gate
            yield f"{prefix}up_proj.weight", up
        elif name.endswith(".experts.down_proj"):
            yield f"{name}.weight", array
        else:
            yield name, array
    if pending:
        missing = {name: num_experts - len(parts) for name, parts in pending.items()}
        raise ModelLoadError(directory, f"experts missing from the checkpoint: {missing}")


def _byte_level_vocab(directory: Path, vocab_size: int) -> Callable:
    """The `tokenizer.ggml.*` metadata writer of a byte-level BPE tokenizer.json, as llama.cpp's
    converter writes it (vocabulary padded to the model's size with unused [PAD] tokens)."""
    from lmserve.tokenizer import LLAMA3_SPLIT, QWEN2_SPLIT

    file = directory / "tokenizer.json"
    if not file.is_file():
        raise ModelLoadError(directory, f"no tokenizer.json: a GGUF file needs the tokenizer; {_CONVERT_HINT}")
    spec = json.loads(file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    pre = _pre_tokenizer_name(spec.get("pre_tokenizer") or {}, {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2"})
    if model.get("type") != "BPE" or pre is None:
        raise ModelLoadError(file, f"quantize converts only byte-level BPE tokenizers of the GPT-2, Llama 3, "
                                   f"Qwen2 or SmolLM kind from a Hugging Face directory; {_CONVERT_HINT}")
    by_id = {index: token for token, index in model["vocab"].items()}
    types = {index: gguf.TokenType.NORMAL for index in by_id}
    for added in spec.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        types[added["id"]] = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
    size = max(vocab_size, max(by_id) + 1)
    tokens = [by_id.get(i, f"[PAD{i}]") for i in range(size)]
    token_types = [types.get(i, gguf.TokenType.UNUSED) for i in range(size)]
    special = gguf.SpecialVocab(directory, load_merges=True, n_vocab=size)

    def write(writer):
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(token_types)
        special.add_to_gguf(writer, quiet=True)

    return write


def _pre_tokenizer_name(pre: dict, split_names: dict[str, str]) -> str | None:
    """llama.cpp's name for a tokenizer.json pre-tokenizer, or None if it is none we know."""
    steps = pre.get("pretokenizers") if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits"):
        return "smollm"
    if kinds == ["Split", "ByteLevel"]:
        return split_names.get((steps[0].get("pattern") or {}).get("Regex"))
    return None


# ---- writing -------------------------------------------------------------------------------

def quantize_model(source: str | Path, output: str | Path, type_name: str) -> Counter:
    """Write `source` (GGUF file or HF directory) to the GGUF file `output` with its matrices in
    `type_name`; returns how many tensors were written in each type."""
    qtype = quant_type(type_name)
    source = Path(source)
    if not source.exists():
        raise ModelLoadError(source, "no such file or directory")
    src = _hf_source(source) if source.is_dir() else _gguf_source(source)
    output = Path(output)
    if output.resolve() == source.resolve():
        raise InvalidParameterError("output", "must differ from the input file")
    writer = gguf.GGUFWriter(str(output), src.arch)
    counts: Counter = Counter()
    try:
        src.write_metadata(writer)
        writer.add_file_type(gguf.LlamaFileType[_FILE_TYPES[type_name]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        for name, array in src.tensors():
            stored_type = storage_type(name, array.shape, qtype)
            data = pack(array, stored_type)
            plain = stored_type in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16)
            writer.add_tensor(name, data, raw_dtype=None if plain else stored_type)
            counts[stored_type.name] += 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    except BaseException:
        writer.close()
        output.unlink(missing_ok=True)  # no half-written file that looks like a model
        raise
    writer.close()
    logger.info("wrote %s: %s", output, ", ".join(f"{k} x{v}" for k, v in sorted(counts.items())))
    return counts
