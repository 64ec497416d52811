"""GGUF loading of the Llama family: tiny transformers models written to GGUF the way llama.cpp's
converter writes them (llama q/k rows permuted, weights in several tensor types) load in lmserve
with the logits of the transformers model carrying the same (de)quantized weights."""

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from lmserve import LLM, SamplingParams
from lmserve.loader.gguf import hf_tensor_name
from tests.tiny_models import build_tiny_model

Q = gguf.GGMLQuantizationType
PROMPT = [5, 17, 250, 3, 99, 42, 7, 7, 130, 64, 12, 300, 1, 77, 88, 150]
GGUF_ARCH = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _permute_for_llama_cpp(w: np.ndarray, n_heads: int) -> np.ndarray:
    """What llama.cpp's HF converter does to Llama q/k rows (interleaved rotary pairs)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _gguf_name(hf_name: str, n_layers: int) -> str:
    candidates = ["token_embd.weight", "output_norm.weight", "output.weight"]
    for i in range(n_layers):
        for kind in ("attn_norm", "ffn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "attn_q_norm",
                     "attn_k_norm", "ffn_gate", "ffn_up", "ffn_down", "ffn_gate_inp", "ffn_gate_exps",
                     "ffn_up_exps", "ffn_down_exps", "ffn_gate_shexp", "ffn_up_shexp", "ffn_down_shexp",
                     "ffn_gate_inp_shexp"):
            candidates += [f"blk.{i}.{kind}.weight", f"blk.{i}.{kind}.bias"]
    return next(c for c in candidates if hf_tensor_name(c) == hf_name)


def _converter_tensors(hf_name: str, stored: np.ndarray) -> list[tuple[str, np.ndarray]]:
    """(HF name, array) pairs as llama.cpp's converter sees them: transformers keeps experts'
    gate and up projections fused in one [E, 2*I, H] tensor, GGUF stores them stacked apart."""
    if hf_name.endswith("experts.gate_up_proj"):
        gate, up = np.split(stored, 2, axis=1)
        prefix = hf_name.removesuffix("gate_up_proj")
        return [(f"{prefix}gate_proj.weight", gate), (f"{prefix}up_proj.weight", up)]
    if hf_name.endswith("experts.down_proj"):
        return [(f"{hf_name}.weight", stored)]
    return [(hf_name, stored)]


def _add_moe_metadata(writer: gguf.GGUFWriter, cfg) -> None:
    num_experts = getattr(cfg, "num_local_experts", None) or getattr(cfg, "num_experts", None)
    if not num_experts:
        return
    writer.add_expert_count(num_experts)
    writer.add_expert_used_count(cfg.num_experts_per_tok)
    if getattr(cfg, "moe_intermediate_size", None):
        writer.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if getattr(cfg, "shared_expert_intermediate_size", None):
        writer.add_expert_shared_feed_forward_length(cfg.shared_expert_intermediate_size)


def write_gguf(hf_model, path, arch: str, linear_type, per_expert_names: bool = False):
    """Write `hf_model` as GGUF with 2-D projection weights in `linear_type`; update hf_model's
    weights in place to the dequantized values so it stays the exact reference. `per_expert_names`
    writes MoE experts one tensor each (`blk.N.ffn_gate.E.weight`) as llama.cpp did before 2024."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    tokens = [chr(0x100 + i) for i in range(cfg.vocab_size - 1)] + ["\u0100\u0101"]
    writer.add_token_list(tokens)
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_token_merges(["\u0100 \u0101"])
    _add_moe_metadata(writer, cfg)
    state = hf_model.state_dict()
    for name, tensor in state.items():
        if cfg.tie_word_embeddings and name == "lm_head.weight":
            continue
        w = tensor.float().numpy()
        projection = w.ndim >= 2 and "embed" not in name and "lm_head" not in name
        qtype = linear_type if projection else Q.F32
        stored = quantize(w, qtype) if qtype != Q.F32 else w
        exact = dequantize(stored, qtype).reshape(w.shape) if qtype != Q.F32 else w
        with torch.no_grad():
            tensor.copy_(torch.from_numpy(exact))
        if arch == "llama" and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads
            stored = _permute_for_llama_cpp(stored, heads)
        raw_dtype = None if qtype in (Q.F32, Q.F16) else qtype
        for hf_name, part in _converter_tensors(name, stored):
            gguf_name = _gguf_name(hf_name, cfg.num_hidden_layers)
            if per_expert_names and gguf_name.endswith("_exps.weight"):
                for expert, expert_part in enumerate(part):
                    writer.add_tensor(gguf_name.replace("_exps.weight", f".{expert}.weight"),
                                      np.ascontiguousarray(expert_part), raw_dtype=raw_dtype)
            else:
                writer.add_tensor(gguf_name, part, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind, arch, linear_type", [
    ("llama_gqa", "llama", Q.F32), ("llama_gqa", "llama", Q.Q8_0), ("llama_mqa_tied", "llama", Q.Q4_0),
    ("qwen2", "qwen2", Q.Q4_1), ("qwen3", "qwen3", Q.F16), ("llama_gqa", "llama", Q.BF16),
    ("qwen2", "qwen2", Q.Q5_0),
])
def test_gguf_logits_match_transformers(kind, arch, linear_type, tmp_path):
    hf_model = build_tiny_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}.gguf"
    write_gguf(hf_model, path, arch, linear_type)
    llm = LLM(str(path), dtype="float32", quantization="none")
    assert llm.engine.checkpoint.tensor_types.get(linear_type.name, 0) > 0
    captured = []
    sampler = llm.engine.sampler
    llm.engine.sampler = lambda logits, rows, stops=None: (captured.append(logits.clone()),
                                                           sampler(logits, rows, stops))[1]
    out = llm.generate([PROMPT], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    generated = out.outputs[0].token_ids
    with torch.no_grad():
        reference = hf_model(torch.tensor([PROMPT + generated])).logits[0].float()
    n = len(PROMPT)
    diff = (torch.cat(captured) - reference[n - 1: n + 7]).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    assert generated == reference[n - 1: n + 7].argmax(-1).tolist()
