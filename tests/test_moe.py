"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE) against transformers on the same
random weights, from safetensors and from GGUF files written the way llama.cpp's converter writes
them, plus the routing arithmetic of the MoE block itself."""

import json

import gguf
import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from lmserve import LLM
from lmserve.config import ModelConfig
from lmserve.errors import InvalidParameterError, ModelLoadError
from lmserve.layers.moe import SparseMoeBlock
from lmserve.models.llama import LlamaMLP
from tests.test_gguf_loader import write_gguf
from tests.test_model_numerics import (assert_logits_and_greedy_tokens_match,
                                       assert_mixed_length_batch_greedy_tokens_match)
from tests.tiny_models import MOE_TINY_MODELS, build_tiny_model

Q = gguf.GGMLQuantizationType
GGUF_ARCH = {"mixtral": "llama", "qwen2_moe": "qwen2moe", "qwen3_moe": "qwen3moe"}


@pytest.mark.parametrize("kind", MOE_TINY_MODELS)
def test_fused_expert_checkpoint_names_load(kind, tiny_model_factory, tmp_path):
    """transformers v5 keeps experts fused in memory (`experts.gate_up_proj` [E, 2I, H]); a
    checkpoint written with those names loads like the per-expert one save_pretrained writes."""
    directory, hf_model = tiny_model_factory(kind)
    state = {name: t.contiguous() for name, t in hf_model.state_dict().items()}
    assert any(name.endswith("experts.gate_up_proj") for name in state)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    assert_logits_and_greedy_tokens_match(tmp_path, hf_model)


@pytest.mark.parametrize("kind, linear_type", [("mixtral", Q.Q8_0), ("qwen2_moe", Q.Q8_0),
                                               ("qwen3_moe", Q.Q8_0), ("qwen2_moe", Q.F32)])
def test_gguf_matches_transformers(kind, linear_type, tmp_path):
    hf_model = build_tiny_model(kind, tmp_path / "hf")
    path = tmp_path / f"{kind}.gguf"
    write_gguf(hf_model, path, GGUF_ARCH[kind], linear_type)  # hf_model now holds the dequantized weights
    reader = gguf.GGUFReader(str(path))
    stacked = [t for t in reader.tensors if t.name.endswith("ffn_gate_exps.weight")]
    assert stacked and all(t.tensor_type == linear_type for t in stacked)
    assert_logits_and_greedy_tokens_match(path, hf_model, quantization="none")
    assert_mixed_length_batch_greedy_tokens_match(path, hf_model, quantization="none")


def test_gguf_with_one_tensor_per_expert_loads(tmp_path):
    """Mixtral GGUF files converted before llama.cpp stacked the experts."""
    hf_model = build_tiny_model("mixtral", tmp_path / "hf")
    path = tmp_path / "mixtral.gguf"
    write_gguf(hf_model, path, "llama", Q.Q8_0, per_expert_names=True)
    assert "blk.0.ffn_gate.3.weight" in {t.name for t in gguf.GGUFReader(str(path)).tensors}
    assert_logits_and_greedy_tokens_match(path, hf_model, quantization="none")


def _expert_by_expert(block: SparseMoeBlock, x: torch.Tensor, top_k: int, renormalize: bool) -> torch.Tensor:
    """Reference: per token, softmax over the router, its top-k experts each run on their own."""
    gate_up, down = block.experts.gate_up_proj, block.experts.down_proj
    rows = []
    for token in x:
        probs = torch.softmax(block.gate.weight @ token, dim=-1)
        chosen = sorted(range(len(probs)), key=lambda e: -probs[e].item())[:top_k]
        total = sum(probs[e] for e in chosen) if renormalize else 1.0
        out = torch.zeros_like(token)
        for e in chosen:
            gate, up = (gate_up[e] @ token).chunk(2)
            out += probs[e] / total * (down[e] @ (F.silu(gate) * up))
        if block.shared_expert is not None:
            out += torch.sigmoid(block.shared_expert_gate.weight @ token) * block.shared_expert(token)
        rows.append(out)
    return torch.stack(rows)


@pytest.mark.parametrize("renormalize, shared", [(True, False), (False, True)])
def test_each_token_gets_weighted_sum_of_its_top_k_experts(renormalize, shared):
    torch.manual_seed(0)
    hidden, num_experts, top_k, inter = 32, 8, 3, 24
    cfg = ModelConfig("qwen2_moe", 64, hidden, 48, 1, 4, 4, 8, 64)
    block = SparseMoeBlock(hidden, num_experts, top_k, inter, renormalize, LlamaMLP(cfg) if shared else None)
    for param in block.parameters():
        param.data.normal_(0, 0.5)
    x = torch.randn(37, hidden)
    expected = _expert_by_expert(block, x, top_k, renormalize)
    torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    # a token's output does not depend on the other tokens in the batch
    torch.testing.assert_close(block(x[5:6]), expected[5:6], rtol=1e-5, atol=1e-5)


def test_checkpoint_missing_an_expert_is_refused(tiny_model_factory, tmp_path):
    directory, _ = tiny_model_factory("mixtral")
    with safe_open(str(directory / "model.safetensors"), "pt") as f:
        state = {name: f.get_tensor(name) for name in f.keys() if ".experts.2.w3." not in name}
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    missing_up_rows = r"lacks expert\(s\) \[2\] of model\.layers\.\d\.mlp\.experts\.gate_up_proj \(up\)"
    with pytest.raises(ModelLoadError, match=missing_up_rows):
        LLM(str(tmp_path), dtype="float32")


def test_top_k_larger_than_expert_count_is_refused():
    with pytest.raises(InvalidParameterError, match="num_experts_per_tok"):
        ModelConfig("mixtral", 64, 32, 48, 1, 4, 4, 8, 64, num_experts=4, num_experts_per_tok=5,
                    moe_intermediate_size=16)


def test_qwen2_moe_config_reads_dense_layers_and_shared_expert(tiny_model_factory):
    from lmserve.loader.hf_config import model_config_from_hf

    directory, _ = tiny_model_factory("qwen2_moe")
    cfg = model_config_from_hf(json.loads((directory / "config.json").read_text()), "config.json")
    assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.shared_expert_intermediate_size) == (4, 2, 96)
    assert [cfg.is_moe_layer(i) for i in range(cfg.num_layers)] == [True, False]
