"""`lmserve quantize`: the Q4_K packing against gguf-py's dequantizer, GGUF and Hugging Face input
written in each type (bytes equal to gguf-py's own quantizer where it has one, values within each
format's quantization error), the written files loading in lmserve with the logits of transformers
on the same dequantized weights, and greedy agreement of quantized tiny models with the original;
a Qwen3-MoE directory written as llama.cpp's qwen3moe file (stacked experts, F32 router) that
lmserve runs with its experts packed in the fused decoder."""

import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from gguf.quants import dequantize, quantize

from lmserve import LLM, SamplingParams
from lmserve.entrypoints.cli import main
from lmserve.errors import LmserveError
from lmserve.loader.gguf import hf_tensor_name
from lmserve.quant import native
from lmserve.quant.gguf_writer import QUANT_TYPE_NAMES, quantize_model, quantize_q4_k, storage_type
from tests.test_gguf_loader import write_gguf
from tests.test_moe_native import assert_blocks_packed_and_native, assert_greedy_matches
from tests.tiny_models import COMMON, build_tiny_model
from tests.tiny_tokenizer import SAMPLE_TEXT, save_tokenizer

Q = gguf.GGMLQuantizationType
PROMPT = [5, 17, 250, 3, 99, 42, 7, 7, 130]


def _q4_k_error_bound(x: np.ndarray) -> np.ndarray:
    """Largest error a min/max Q4_K fit may make in each 32-element sub-block: half a step, the
    step being the sub-block's range over 15 levels widened by the 6-bit rounding of its scale
    and min (one super-block unit each)."""
    sub = x.reshape(-1, 8, 32)
    offset = -np.minimum(sub.min(-1), 0)
    span = sub.max(-1) + offset
    dmin = offset.max(-1, keepdims=True) / 63 * 1.002
    d = (span.max(-1, keepdims=True) + dmin) / 15 / 63 * 1.002
    return 0.5 * ((span + dmin) / 15 + d) + 1e-7


def _step(x: np.ndarray, qtype) -> np.ndarray:
    """One quantization step of each block of `x` in `qtype` (an error bound for round-to-nearest
    with the clipping each format allows)."""
    if qtype == Q.Q4_K:
        return np.repeat(_q4_k_error_bound(x), 32, axis=-1).reshape(x.shape)
    if qtype in (Q.F32, Q.F16):  # float copies: at most fp16's rounding
        return np.abs(x) * (0 if qtype == Q.F32 else 2**-11) + 1e-7
    blocks = x.reshape(-1, 32)
    amax = np.abs(blocks).max(-1, keepdims=True)
    step = {Q.Q8_0: amax / 127, Q.Q4_0: amax / 8, Q.Q5_0: amax / 16,
            Q.Q4_1: (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15}[qtype]
    return np.broadcast_to(step * 1.01 + 1e-7, blocks.shape).reshape(x.shape)


def test_q4_k_round_trips_through_gguf_dequantize():
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((48, 512)) * 0.05).astype(np.float32)
    x[3, :256] += 0.3  # a super-block with no negative values
    x[5] = 0.0
    x[7, 40] = 4.0  # an outlier dominating its super-block's scale
    packed = quantize_q4_k(x)
    assert packed.shape == (48, 2 * 144) and packed.dtype == np.uint8
    restored = dequantize(packed, Q.Q4_K)
    assert np.all(np.abs(restored - x) <= _q4_k_error_bound(x).repeat(32, axis=-1).reshape(x.shape))
    assert np.all(restored[5] == 0)
    # a 4-bit fit with 6-bit sub-block scales is about as close as gguf-py's Q4_1 (fp16 scales per 32)
    q4_1_error = np.abs(dequantize(quantize(x, Q.Q4_1), Q.Q4_1) - x).mean()
    assert np.abs(restored - x).mean() <= 1.3 * q4_1_error


def test_rows_that_do_not_fit_the_block_fall_back():
    assert storage_type("t", (64, 256), Q.Q4_K) == Q.Q4_K
    assert storage_type("t", (64, 96), Q.Q4_K) == Q.Q5_0  # as llama.cpp falls back
    assert storage_type("t", (64, 100), Q.Q4_0) == Q.F16
    assert storage_type("t", (256,), Q.Q4_K) == Q.F32
    assert storage_type("blk.0.ffn_gate_inp.weight", (8, 256), Q.Q4_K) == Q.F32  # a router, as llama.cpp keeps it


def _wide_llama(directory, **overrides):
    """A tiny Llama whose rows (256, 512) fit Q4_K's super-blocks."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(99)
    config = LlamaConfig(**{**COMMON, "hidden_size": 256, "intermediate_size": 512, "initializer_range": 0.05,
                            **overrides})
    model = AutoModelForCausalLM.from_config(config).eval()
    model.save_pretrained(directory)
    return model


def _unpermute(w: np.ndarray, n_heads: int) -> np.ndarray:
    return w.reshape(n_heads, w.shape[0] // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _transformers_tensor(state: dict, name: str) -> torch.Tensor:
    """The part of a transformers state dict that the tensor with HF name `name` fills: stacked
    experts go to the fused `experts.gate_up_proj` (gate rows, then up) and `experts.down_proj`."""
    prefix, _, proj = name.removesuffix(".weight").rpartition(".")
    if not prefix.endswith(".experts"):
        return state[name]
    if proj == "down_proj":
        return state[f"{prefix}.down_proj"]
    fused = state[f"{prefix}.gate_up_proj"]
    half = fused.shape[1] // 2
    return fused[:, :half] if proj == "gate_proj" else fused[:, half:]


def _load_into_transformers(hf_model, path):
    """Set `hf_model`'s weights to the dequantized tensors of the GGUF file at `path`."""
    cfg = hf_model.config
    state = hf_model.state_dict()
    reader = gguf.GGUFReader(str(path))
    interleaved = reader.fields["general.architecture"].contents() == "llama"
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        target = _transformers_tensor(state, name)
        w = dequantize(tensor.data, tensor.tensor_type).reshape(target.shape)
        if interleaved and name.endswith(("q_proj.weight", "k_proj.weight")):
            w = _unpermute(w, cfg.num_attention_heads if "q_proj" in name else cfg.num_key_value_heads)
        with torch.no_grad():
            target.copy_(torch.from_numpy(np.array(w)))
    return hf_model


def _assert_logits_match(path, hf_model):
    llm = LLM(str(path), dtype="float32", quantization="none")
    logits = llm.engine.score(PROMPT)
    with torch.no_grad():
        reference = hf_model(torch.tensor([PROMPT])).logits[0]
    assert (logits - reference).abs().max().item() <= 1e-4
    return llm


def _train_on_sample_text(hf_model, token_ids, steps=25):
    """A few Adam steps on SAMPLE_TEXT, so greedy predictions are confident rather than the
    near-ties of random weights (where any rounding flips the argmax)."""
    torch.manual_seed(5)
    data = torch.tensor(token_ids)
    optimizer = torch.optim.Adam(hf_model.parameters(), lr=3e-3)
    hf_model.train()
    for _ in range(steps):
        starts = torch.randint(0, len(token_ids) - 49, (4,))
        batch = torch.stack([data[s: s + 49] for s in starts])
        logits = hf_model(batch[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return hf_model.eval()


@pytest.fixture(scope="module")
def f32_gguf(tmp_path_factory):
    """The wide tiny Llama, trained briefly on SAMPLE_TEXT, written as an F32 GGUF file (llama.cpp
    names, permuted q/k rows); also the text's token ids."""
    from tokenizers import Tokenizer

    directory = tmp_path_factory.mktemp("wide")
    save_tokenizer(directory, 320)
    token_ids = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(SAMPLE_TEXT).ids
    hf_model = _train_on_sample_text(_wide_llama(directory / "hf"), token_ids)
    path = directory / "f32.gguf"
    write_gguf(hf_model, path, "llama", Q.F32)
    return path, token_ids


@pytest.mark.parametrize("type_name", QUANT_TYPE_NAMES)
def test_quantize_gguf_input(type_name, f32_gguf, tmp_path):
    source, _ = f32_gguf
    qtype = Q[type_name.upper()]
    out = tmp_path / f"{type_name}.gguf"
    quantize_model(source, out, type_name)
    originals = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(source)).tensors}
    written = gguf.GGUFReader(str(out))
    assert written.fields["general.architecture"].contents() == "llama"
    assert written.fields["tokenizer.ggml.tokens"].contents() == \
        gguf.GGUFReader(str(source)).fields["tokenizer.ggml.tokens"].contents()
    for tensor in written.tensors:
        original = originals[tensor.name]
        if original.ndim == 1:
            assert tensor.tensor_type == Q.F32 and np.array_equal(tensor.data, original)
            continue
        assert tensor.tensor_type == qtype, tensor.name
        restored = dequantize(tensor.data, qtype)
        assert np.all(np.abs(restored - original) <= _step(original, qtype)), tensor.name
        if qtype != Q.Q4_K:  # gguf-py has its own quantizer for these: same bytes
            assert np.array_equal(tensor.data, quantize(original, qtype)), tensor.name
    _assert_logits_match(out, _load_into_transformers(_wide_llama(tmp_path / "ref"), out))


# Measured on 16 prompts from the training text, 8 greedy tokens each: prompts whose first token
# equals the F32 original's: q8_0 16, q5_0 16, q4_1 15, q4_0 16, q4_k 15; whose whole 8-token
# continuation does: 16, 16, 15, 15, 14.
@pytest.mark.parametrize("type_name", QUANT_TYPE_NAMES)
def test_quantized_model_greedy_agreement(type_name, f32_gguf, tmp_path):
    source, token_ids = f32_gguf
    out = tmp_path / f"{type_name}.gguf"
    quantize_model(source, out, type_name)
    prompts = [token_ids[s: s + 5] for s in range(0, 160, 10)]
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    original, quantized = ([o.outputs[0].token_ids for o in LLM(str(path), dtype="float32", quantization="none")
                            .generate(prompts, params, use_tqdm=False)] for path in (source, out))
    same_first = sum(o[0] == q[0] for o, q in zip(original, quantized))
    same_all = sum(o == q for o, q in zip(original, quantized))
    assert same_first >= 14 and same_all >= 12, f"{type_name}: first {same_first}/16, all {same_all}/16"


@pytest.mark.parametrize("tied", [False, True])
def test_cli_quantizes_hf_directory(tied, tmp_path, capsys):
    from tokenizers import Tokenizer

    directory = tmp_path / "hf"
    hf_model = _wide_llama(directory, tie_word_embeddings=tied, num_key_value_heads=1 if tied else 2)
    save_tokenizer(directory, 320)
    out = tmp_path / "q8.gguf"
    assert main(["quantize", str(directory), str(out), "--type", "q8_0"]) == 0
    assert "wrote" in capsys.readouterr().err
    reader = gguf.GGUFReader(str(out))
    names = {t.name for t in reader.tensors}
    assert ("output.weight" in names) != tied and "blk.1.attn_q.weight" in names
    assert {t.tensor_type for t in reader.tensors if len(t.shape) == 2} == {Q.Q8_0}
    llm = _assert_logits_match(out, _load_into_transformers(hf_model, out))
    expected = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(SAMPLE_TEXT[:300]).ids
    assert llm.tokenizer.encode(SAMPLE_TEXT[:300]) == expected
    assert llm.tokenizer.eos_token_id == 0


@pytest.mark.skipif(native.load() is None, reason="the C++ extension did not build here")
def test_cli_quantizes_qwen3_moe_directory(tmp_path):
    """llama.cpp's qwen3moe file: expert metadata, each layer's experts stacked [E, rows, cols] in
    the chosen type, the router F32. It loads with the logits of transformers on the dequantized
    weights, and by default with its experts packed in the fused decoder, greedy tokens unchanged."""
    directory = tmp_path / "hf"
    hf_model = build_tiny_model("qwen3_moe", directory)  # 4 experts, top 2, 32 wide; hidden 64
    save_tokenizer(directory, 320)
    out = tmp_path / "q8.gguf"
    assert main(["quantize", str(directory), str(out), "--type", "q8_0"]) == 0
    reader = gguf.GGUFReader(str(out))
    assert reader.fields["general.architecture"].contents() == "qwen3moe"
    assert {key: reader.fields[f"qwen3moe.{key}"].contents() for key in
            ("expert_count", "expert_used_count", "expert_feed_forward_length")} == \
        {"expert_count": 4, "expert_used_count": 2, "expert_feed_forward_length": 32}
    tensors = {t.name: t for t in reader.tensors}
    for layer in range(2):
        assert tensors[f"blk.{layer}.ffn_gate_inp.weight"].tensor_type == Q.F32
        assert tensors[f"blk.{layer}.attn_q_norm.weight"].tensor_type == Q.F32
        for kind, rows, cols in (("gate", 32, 64), ("up", 32, 64), ("down", 64, 32)):
            stacked = tensors[f"blk.{layer}.ffn_{kind}_exps.weight"]
            assert stacked.tensor_type == Q.Q8_0 and stacked.shape.tolist() == [cols, rows, 4]  # innermost first
    _assert_logits_match(out, _load_into_transformers(hf_model, out))
    llm = LLM(str(out), dtype="float32", max_num_batched_tokens=64)
    assert llm.engine.runner.fused_decode is not None
    assert_blocks_packed_and_native(llm)
    assert_greedy_matches(llm, hf_model, logit_tolerance=1e-3)


def test_fused_expert_checkpoint_names_write_the_same_file(tiny_model_factory, tmp_path):
    """transformers v5's in-memory names (`experts.gate_up_proj` [E, 2I, H], `experts.down_proj`)
    are stacked as save_pretrained's one tensor per expert are."""
    from safetensors.torch import save_file

    source, hf_model = tiny_model_factory("qwen3_moe")
    fused = tmp_path / "fused"
    fused.mkdir()
    state = {name: t.contiguous() for name, t in hf_model.state_dict().items()}
    assert "model.layers.0.mlp.experts.gate_up_proj" in state
    save_file(state, str(fused / "model.safetensors"))
    shutil.copy(source / "config.json", fused)
    per_expert = shutil.copytree(source, tmp_path / "per_expert")
    files = []
    for directory in (per_expert, fused):
        save_tokenizer(directory, 320)
        files.append(tmp_path / f"{directory.name}.gguf")
        quantize_model(directory, files[-1], "q8_0")
    written = [{t.name: t.data.tobytes() for t in gguf.GGUFReader(str(f)).tensors} for f in files]
    assert "blk.1.ffn_up_exps.weight" in written[0] and written[0] == written[1]


def test_moe_that_llama_cpp_would_compute_differently_is_refused(tiny_model_factory, tmp_path):
    """llama.cpp's qwen3moe graph always renormalises the top-k weights."""
    source, _ = tiny_model_factory("qwen3_moe")
    directory = shutil.copytree(source, tmp_path / "hf")
    save_tokenizer(directory, 320)
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, "norm_topk_prob": False}))
    with pytest.raises(LmserveError, match="norm_topk_prob"):
        quantize_model(directory, tmp_path / "out.gguf", "q8_0")
    assert not (tmp_path / "out.gguf").exists()


def test_hf_directory_without_tokenizer_is_refused(tiny_model_factory, tmp_path):
    directory, _ = tiny_model_factory("llama_gqa")
    with pytest.raises(LmserveError, match="tokenizer.json"):
        quantize_model(directory, tmp_path / "out.gguf", "q8_0")
    assert not (tmp_path / "out.gguf").exists()


def test_cli_bad_type_names_it(f32_gguf, tmp_path, capsys):
    source, _ = f32_gguf
    assert main(["quantize", str(source), str(tmp_path / "x.gguf"), "--type", "q3_k"]) == 2
    assert "type" in capsys.readouterr().err
