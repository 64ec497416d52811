"""Mixture-of-experts blocks with packed experts: the native `MoeFeedForward`
(lmserve/quant/csrc/moe_ffn.h) against the module path on the same packed block, engine runs with
experts quantized at load against transformers on the dequantized weights, and GGUF MoE files
that load with their experts packed (no dense expert tensor) and match transformers."""

import gguf
import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.config import ModelConfig
from lmserve.layers.linear import Linear
from lmserve.layers.moe import SparseMoeBlock, StackedExperts
from lmserve.models.llama import LlamaMLP
from lmserve.quant import native
from lmserve.quant.packed import BlockWeight, KernelOrGemmWeight, quantize_int4, quantize_int8
from tests.test_gguf_loader import write_gguf
from tests.test_model_numerics import PROMPT, LogitRecorder, hf_logits
from tests.tiny_models import build_tiny_model

pytestmark = pytest.mark.skipif(native.load() is None, reason="the C++ extension did not build here")

Q = gguf.GGMLQuantizationType
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}
QUANTIZE = {"int8": quantize_int8, "int4": quantize_int4}
# (hidden, experts, top_k, expert width, renormalise, shared expert width) of each family's shape
SHAPES = {"mixtral": (64, 8, 2, 96, True, 0), "qwen2_moe": (64, 8, 4, 32, False, 96),
          "qwen3_moe": (128, 16, 8, 64, True, 0)}


def _packed_block(kind: str, mode: str, seed: int = 0) -> SparseMoeBlock:
    hidden, num_experts, top_k, inter, renormalize, shared = SHAPES[kind]
    torch.manual_seed(seed)
    shared_expert = LlamaMLP(ModelConfig("qwen2_moe", 64, hidden, 48, 1, 4, 4, 8, 64), shared) if shared else None
    block = SparseMoeBlock(hidden, num_experts, top_k, inter, renormalize, shared_expert)
    for param in block.parameters():
        param.data.normal_(0, 0.5)
    for module in block.modules():
        if isinstance(module, (Linear, StackedExperts)):
            module.quantize_(mode)
    return block


def _relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours - reference).abs().max() / reference.abs().max()).item()


def _assert_native_equals_module(block: SparseMoeBlock, rows: int, tolerance: float = 3e-5) -> None:
    """`tolerance`: the two paths round silu(gate) * up differently (PyTorch's exp against the
    kernel's), and the down projection rounds its input to int16 per group of 32, so now and then
    a value lands one step (2^-15 of its group's largest) apart; 1.3e-5 is the most measured."""
    ffn, reason = block.native_ffn(native.load())
    assert reason is None and ffn.num_experts == block.experts.num_experts
    x = torch.randn(rows, ffn.hidden_size, generator=torch.Generator().manual_seed(rows))
    ours = ffn.forward(x)
    with torch.no_grad():
        reference = block(x)
    assert _relative(ours, reference) <= tolerance
    # every row is computed on its own: alone it gives exactly what it gave in the batch
    assert torch.equal(torch.cat([ffn.forward(x[i : i + 1]) for i in range(rows)]), ours)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("kind", list(SHAPES))
def test_native_block_equals_the_module_path(kind, mode):
    """Rows 1, 3, 17 and 64 (experts getting one row up to all of them). The module path runs the
    packed kernel only up to `kernel_max_rows` rows and above that an fp32 GEMM of the dequantized
    weights, which the kernel's int16 activations match to ~1e-5 per matmul: so for 64 rows it
    is compared both as it is (looser) and with the kernel for every row count, as the native
    block runs it."""
    block = _packed_block(kind, mode)
    assert all(isinstance(w, BlockWeight) for e in block.experts.packed for w in (e.gate_up, e.down))
    assert block.experts.gate_up_proj is None and block.experts.down_proj is None
    for rows in (1, 3, 17):
        _assert_native_equals_module(block, rows)
    _assert_native_equals_module(block, 64, tolerance=3e-4)
    for module in block.modules():
        if isinstance(module, KernelOrGemmWeight):
            module.kernel_max_rows = 64
    _assert_native_equals_module(block, 64)


def test_native_block_is_refused_where_it_does_not_apply():
    ext = native.load()
    hidden, num_experts, top_k, inter, renormalize, _ = SHAPES["mixtral"]
    dense = SparseMoeBlock(hidden, num_experts, top_k, inter, renormalize)
    assert dense.native_ffn(ext) == (None, "the experts are not block-quantized")
    assert dense.native_ffn(None) == (None, "the native extension is unavailable")
    with_dense_shared = _packed_block("qwen2_moe", "int8")
    shared = with_dense_shared.shared_expert.down_proj
    shared.packed, shared.weight = None, torch.nn.Parameter(torch.zeros(hidden, 96), requires_grad=False)
    ffn, reason = with_dense_shared.native_ffn(ext)
    assert ffn is None and "shared expert" in reason
    packed = _packed_block("mixtral", "int8")
    ffn, _ = packed.native_ffn(ext)
    assert ffn.forward(torch.empty(0, hidden)).shape == (0, hidden)
    router = packed.gate.weight.data
    with pytest.raises(RuntimeError, match="6 tensors"):
        ext.MoeFeedForward(router, [], [], top_k, renormalize, [], [], torch.empty(0))
    with pytest.raises(RuntimeError, match="top_k must be"):
        ext.MoeFeedForward(router, [], [], num_experts + 1, renormalize, [], [], torch.empty(0))


def _moe_blocks(llm: LLM) -> list[SparseMoeBlock]:
    return [m for m in llm.engine.model.modules() if isinstance(m, SparseMoeBlock)]


def assert_greedy_matches(llm: LLM, hf_model, logit_tolerance: float) -> None:
    """32 greedy tokens equal to transformers' argmax given the same prefix; the logits of the
    prefill and 16 decode steps within `logit_tolerance` (the packed kernels round activations to
    int16 per group: 1-3e-4 measured on these models)."""
    recorder = LogitRecorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    generated = llm.generate([PROMPT], params, use_tqdm=False)[0].outputs[0].token_ids
    reference = hf_logits(hf_model, PROMPT + generated)
    n = len(PROMPT)
    diff = (torch.cat(recorder.rows)[:17] - reference[n - 1 : n + 16]).abs().max().item()
    assert diff <= logit_tolerance, f"max abs logit diff {diff}"
    assert generated == reference[n - 1 : n + 31].argmax(-1).tolist()


def assert_blocks_packed_and_native(llm: LLM) -> None:
    """Every MoE block's experts are block-packed with no dense expert tensor left, and its
    native form gives the module's output."""
    blocks = _moe_blocks(llm)
    assert blocks
    for block in blocks:
        experts = block.experts
        assert experts.gate_up_proj is None and experts.down_proj is None
        assert len(experts.packed) == experts.num_experts
        assert all(isinstance(w, BlockWeight) for e in experts.packed for w in (e.gate_up, e.down))
        _assert_native_equals_module(block, 5)
    assert not any(p.dim() == 3 for p in llm.engine.model.parameters())


def _dequantize_like_lmserve(hf_model, mode: str) -> None:
    """Replace in place every weight lmserve quantizes at load (the projections and experts, not
    the embeddings, LM head, router or shared-expert gate) with its dequantized `mode` form."""
    with torch.no_grad():
        for name, param in hf_model.named_parameters():
            if param.dim() < 2 or "embed" in name or "lm_head" in name or \
                    name.endswith(("mlp.gate.weight", "shared_expert_gate.weight")):
                continue
            for matrix in param.view(-1, *param.shape[-2:]):  # stacked experts one by one
                matrix.copy_(torch.from_numpy(QUANTIZE[mode](matrix).dequantize()))


@pytest.mark.parametrize("kind, mode", [("mixtral", "int8"), ("qwen2_moe", "int8"), ("qwen3_moe", "int8"),
                                        ("qwen2_moe", "int4")])
def test_experts_quantized_at_load_match_transformers(kind, mode, tmp_path):
    hf_model = build_tiny_model(kind, tmp_path)
    _dequantize_like_lmserve(hf_model, mode)
    llm = LLM(str(tmp_path), dtype="float32", quantization=mode, max_num_batched_tokens=64)
    assert_blocks_packed_and_native(llm)
    assert_greedy_matches(llm, hf_model, logit_tolerance=1e-3)


@pytest.mark.parametrize("kind, linear_type", [("mixtral", Q.Q8_0), ("qwen2_moe", Q.Q4_1), ("qwen3_moe", Q.Q4_0)])
def test_gguf_experts_load_packed_and_match_transformers(kind, linear_type, tmp_path):
    """llama.cpp's stacked expert tensors ([E, rows, cols]) are packed expert by expert as they
    load, never dequantized; the router and the shared expert's gate (quantized in these files)
    are dequantized exactly."""
    hf_model = build_tiny_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}.gguf"
    write_gguf(hf_model, path, GGUF_ARCH[kind], linear_type)  # hf_model now holds the dequantized weights
    llm = LLM(str(path), dtype="float32", max_num_batched_tokens=64)
    assert_blocks_packed_and_native(llm)
    for block in _moe_blocks(llm):
        assert block.gate.packed is None
    assert_greedy_matches(llm, hf_model, logit_tolerance=1e-3)


def test_packed_experts_split_over_two_ranks_match_one(tmp_path):
    """Each rank packs its slice of every expert from the GGUF file: gate/up rows and down's
    columns in whole quantization groups (the split of the intermediate dim is in units of 32)."""
    from tests.test_tensor_parallel import logits_and_tokens

    hf_model = build_tiny_model("mixtral", tmp_path / "hf")
    path = tmp_path / "mixtral.gguf"
    write_gguf(hf_model, path, "llama", Q.Q8_0)
    whole_tokens, whole = logits_and_tokens(path, 1)
    split_tokens, split = logits_and_tokens(path, 2)
    assert split_tokens == whole_tokens
    assert _relative(split, whole) <= 1e-4


def test_expert_tensors_quantized_per_expert_or_mixed_with_dense_ones():
    """Quantized per-expert tensors are packed; gate and up quantized but down dense (a mixed
    file) leaves every projection dense, the quantized ones dequantized exactly."""
    num_experts, hidden, inter = 4, 64, 32
    weights = {name: torch.randn(num_experts, rows, cols) for name, rows, cols in
               [("gate", inter, hidden), ("up", inter, hidden), ("down", hidden, inter)]}
    per_expert = StackedExperts(num_experts, hidden, inter)
    for e in range(num_experts):
        for name, w in weights.items():
            param, shard = ("down_proj", None) if name == "down" else ("gate_up_proj", name)
            per_expert.load_shard(param, quantize_int8(w[e]), shard, expert=e)
    per_expert.finish_loading()
    assert per_expert.gate_up_proj is None and len(per_expert.packed) == num_experts
    expected = quantize_int8(torch.cat([weights["gate"][1], weights["up"][1]])).dequantize()
    torch.testing.assert_close(per_expert.packed[1].gate_up.dequantize(), torch.from_numpy(expected))

    mixed = StackedExperts(num_experts, hidden, inter)
    for name in ("gate", "up"):
        gq = quantize_int8(weights[name].reshape(-1, hidden))
        stacked = gq.map_rows(lambda a: a.reshape(num_experts, inter, -1))
        mixed.load_shard("gate_up_proj", stacked, name)
    mixed.load_shard("down_proj", weights["down"])
    mixed.finish_loading()
    assert mixed.packed is None
    gate = quantize_int8(weights["gate"].reshape(-1, hidden)).dequantize().reshape(num_experts, inter, hidden)
    assert torch.equal(mixed.gate_up_proj[:, :inter], torch.from_numpy(gate))
    assert torch.equal(mixed.down_proj, weights["down"])
