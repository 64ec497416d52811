"""Gemma 3, GPT-2 and Phi-3 against transformers on the same random weights: from safetensors
(fp32 logits, greedy tokens, mixed-length batches) and from GGUF files written the way llama.cpp's
converter writes them (its tensor names and layouts, projections in Q8_0)."""

import json
import math
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from lmserve import LLM, SamplingParams
from lmserve.entrypoints.cli import main as cli_main
from lmserve.errors import ContextLengthError, ModelLoadError
from lmserve.loader.gguf import hf_tensor_name
from tests.test_model_numerics import PROMPT, LogitRecorder, assert_logits_and_greedy_tokens_match, hf_logits
from tests.tiny_models import FAMILY_TINY_MODELS, build_tiny_model

Q = gguf.GGMLQuantizationType
GGUF_ARCH = {"gemma3": "gemma3", "gpt2": "gpt2", "phi3_longrope": "phi3"}


def _first_logits(llm, prompt):
    recorder = LogitRecorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    return recorder.rows[0][0]


def test_gemma3_local_window_and_global_layer_both_matter(tiny_model_factory):
    directory, hf_model = tiny_model_factory("gemma3")
    cfg = hf_model.config
    assert cfg.sliding_window < len(PROMPT) and "full_attention" in cfg.layer_types
    llm = LLM(str(directory), dtype="float32")
    windows = [layer.sliding_window for layer in llm.engine.model.attention_layers()]
    assert windows == [cfg.sliding_window if t == "sliding_attention" else None for t in cfg.layer_types]
    for layer in llm.engine.model.attention_layers():
        layer.sliding_window = None
    reference = hf_logits(hf_model, PROMPT)[-1]
    assert (_first_logits(llm, PROMPT) - reference).abs().max().item() > 1e-3


def test_phi3_short_factors_when_the_context_stays_within_the_original_length(tiny_model_factory):
    """With max_model_len <= original_max_position_embeddings the short factors apply, as in
    transformers for any sequence of that length; the long ones would change the logits."""
    directory, hf_model = tiny_model_factory("phi3_longrope")
    original = hf_model.config.rope_parameters["original_max_position_embeddings"]
    prompt = PROMPT[:12]
    llm = LLM(str(directory), dtype="float32", max_model_len=original)
    recorder = LogitRecorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    generated = llm.generate([prompt], SamplingParams(max_tokens=original - len(prompt), temperature=0,
                                                      ignore_eos=True), use_tqdm=False)[0].outputs[0].token_ids
    reference = hf_logits(hf_model, prompt + generated)  # <= original tokens: short factors
    n = len(prompt)
    assert (torch.cat(recorder.rows)[:17] - reference[n - 1: n + 16]).abs().max().item() <= 1e-4
    assert generated == reference[n - 1: -1].argmax(-1).tolist()
    long_context = LLM(str(directory), dtype="float32")
    assert (_first_logits(long_context, prompt) - reference[n - 1]).abs().max().item() > 1e-3


def test_gpt2_prompt_longer_than_n_positions_is_refused(tiny_model_factory):
    directory, hf_model = tiny_model_factory("gpt2")
    n_positions = hf_model.config.n_positions
    llm = LLM(str(directory), dtype="float32")
    assert llm.engine.max_model_len == n_positions
    with pytest.raises(ContextLengthError, match=str(n_positions)):
        llm.generate([[1] * (n_positions + 1)], SamplingParams(max_tokens=1), use_tqdm=False)


def test_unsupported_architecture_is_refused_with_the_supported_list(tmp_path, tiny_model_factory, capsys):
    directory, _ = tiny_model_factory("gpt2")
    bad = tmp_path / "bad"
    shutil.copytree(directory, bad)
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["Gemma3ForConditionalGeneration"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelLoadError, match="unsupported architecture") as err:
        LLM(str(bad))
    for name in ("Gemma3ForCausalLM", "GPT2LMHeadModel", "Phi3ForCausalLM"):
        assert name in str(err.value)
    assert cli_main(["info", str(directory)]) == 0
    info = capsys.readouterr().out
    assert "gpt2" in info and "gemma3" in info and "phi3" in info


# ---- GGUF -------------------------------------------------------------------------------------

def _gguf_names(arch: str, num_layers: int) -> dict[str, str]:
    """HF name -> GGUF name, inverting lmserve's map over every tensor name llama.cpp defines."""
    model_arch = next(a for a, name in gguf.MODEL_ARCH_NAMES.items() if name == arch)
    names = {}
    for tensor in gguf.MODEL_TENSORS[model_arch]:
        template = gguf.TENSOR_NAMES[tensor]
        for layer in range(num_layers if "{bid}" in template else 1):
            for suffix in ("weight", "bias"):
                candidate = f"{template.format(bid=layer)}.{suffix}"
                hf_name = hf_tensor_name(candidate, arch)
                if hf_name is not None:
                    names[hf_name] = candidate
    return names


def _add_family_metadata(writer, hf_model, arch: str) -> None:
    cfg = hf_model.config
    if arch == "gpt2":
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if arch == "gemma3":
        full, local = cfg.rope_parameters["full_attention"], cfg.rope_parameters["sliding_attention"]
        writer.add_key_length(cfg.head_dim)
        writer.add_value_length(cfg.head_dim)
        writer.add_rope_freq_base(full["rope_theta"])
        writer.add_rope_freq_base_swa(local["rope_theta"])
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
        writer.add_sliding_window(cfg.sliding_window)
        writer.add_sliding_window_pattern([t == "sliding_attention" for t in cfg.layer_types])
        writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    if arch == "phi3":
        rope = cfg.rope_parameters
        writer.add_rope_freq_base(rope["rope_theta"])
        writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        scale = cfg.max_position_embeddings / rope["original_max_position_embeddings"]
        writer.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(scale) / math.log(rope["original_max_position_embeddings"])))
        writer.add_tensor("rope_factors_long.weight", np.array(rope["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(rope["short_factor"], dtype=np.float32))


def _to_gguf_layout(arch: str, hf_name: str, w: np.ndarray) -> np.ndarray:
    """What llama.cpp's converter does to a tensor; `_from_gguf_layout` undoes it."""
    if arch == "gpt2" and w.ndim == 2 and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return w.T.copy()  # Conv1D [in, out] -> [out, in]
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        return w + 1  # Gemma norms scale by (1 + w); llama.cpp stores the sum
    return w


def _from_gguf_layout(arch: str, hf_name: str, w: np.ndarray) -> np.ndarray:
    if arch == "gpt2" and w.ndim == 2 and hf_name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
        return w.T.copy()
    if arch == "gemma3" and hf_name.endswith("norm.weight"):
        return w - 1
    return w


def write_family_gguf(hf_model, path, arch: str, linear_type=Q.Q8_0) -> None:
    """Write `hf_model` as llama.cpp would, 2-D projections in `linear_type`; hf_model's weights
    become the dequantized values so it stays the exact reference."""
    cfg = hf_model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(getattr(cfg, "intermediate_size", None) or cfg.n_inner or 4 * cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([chr(0x100 + i) for i in range(cfg.vocab_size - 1)] + ["\u0100\u0101"])
    writer.add_token_types([1] * cfg.vocab_size)
    writer.add_token_merges(["\u0100 \u0101"])
    _add_family_metadata(writer, hf_model, arch)
    names = _gguf_names(arch, cfg.num_hidden_layers)
    for hf_name, param in hf_model.named_parameters():  # the tied LM head appears once, as the embedding
        w = _to_gguf_layout(arch, hf_name, param.detach().float().numpy())
        projection = w.ndim == 2 and not hf_name.endswith(("embed_tokens.weight", "wte.weight", "wpe.weight"))
        qtype = linear_type if projection else Q.F32
        stored = quantize(w, qtype) if qtype != Q.F32 else w
        if qtype != Q.F32:
            exact = _from_gguf_layout(arch, hf_name, dequantize(stored, qtype).reshape(w.shape))
            with torch.no_grad():
                param.copy_(torch.from_numpy(exact))
        writer.add_tensor(names[hf_name], stored, raw_dtype=None if qtype == Q.F32 else qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kind", FAMILY_TINY_MODELS)
def test_gguf_q8_0_matches_transformers(kind, tmp_path):
    hf_model = build_tiny_model(kind, tmp_path / "hf")
    if kind == "gemma3":  # llama.cpp's files cannot express query_pre_attn_scalar: it uses head_dim
        for layer in hf_model.model.layers:
            layer.self_attn.scaling = hf_model.config.head_dim ** -0.5
    path = tmp_path / f"{kind}.gguf"
    write_family_gguf(hf_model, path, GGUF_ARCH[kind])
    assert LLM(str(path), dtype="float32", quantization="none").engine.checkpoint.tensor_types["Q8_0"] > 0
    assert_logits_and_greedy_tokens_match(path, hf_model, quantization="none")
