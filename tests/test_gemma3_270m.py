"""The embedded Gemma 3 270M (Q4_K_M GGUF: Q5_0, Q4_K, Q6_K and Q8_0 tensors) against
transformers loading the same GGUF file, both dequantized to fp32: prefill logits and greedy
continuations of plain-text prompts; and the Gemma turn format supplied for a file without a template."""

from pathlib import Path

import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.default_model import resolve_embedded

PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village,",
    "The three primary colors are",
    "def fibonacci(n):",
    "Water boils at a temperature of",
]


@pytest.fixture(scope="module")
def gemma_path():
    return Path(resolve_embedded("gemma3-270m"))


@pytest.fixture(scope="module")
def llm(gemma_path):
    return LLM(str(gemma_path), dtype="float32", quantization="none")


@pytest.fixture(scope="module")
def reference(gemma_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(
        str(gemma_path.parent), gguf_file=gemma_path.name, dtype=torch.float32).eval()


def test_file_has_the_k_quant_mix(llm):
    assert llm.engine.model_config.architecture == "gemma3"
    assert {"Q5_0", "Q4_K", "Q6_K", "Q8_0"} <= set(llm.engine.checkpoint.tensor_types)


def test_prefill_logits_and_greedy_continuations_match_transformers_gguf(llm, reference):
    prompts = [llm.tokenizer.encode(p) for p in PROMPTS]
    captured = []
    sampler = llm.engine.sampler
    llm.engine.sampler = lambda logits, rows, stops=None: (captured.append(logits.clone()), sampler(logits, rows, stops))[1]
    try:
        outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), use_tqdm=False)
    finally:
        llm.engine.sampler = sampler
    # The first step prefills every prompt together: one row per prompt, in order.
    first_step = captured[0]
    assert first_step.shape[0] == len(prompts)
    for i, (ids, out) in enumerate(zip(prompts, outs)):
        generated = out.outputs[0].token_ids
        assert len(generated) == 32
        with torch.no_grad():
            expected = reference(torch.tensor([ids + generated])).logits[0].float()
        diff = (first_step[i] - expected[len(ids) - 1]).abs().max().item()
        assert diff <= 1e-3, f"prompt {i}: max abs prefill logit diff {diff}"
        assert generated == expected[len(ids) - 1: -1].argmax(-1).tolist(), f"prompt {i}: {out.outputs[0].text!r}"


def test_gemma_turn_format_is_supplied(llm):
    prompt = llm.apply_chat_template([{"role": "system", "content": "Be brief."},
                                      {"role": "user", "content": "Hi"},
                                      {"role": "assistant", "content": "Hello!"},
                                      {"role": "user", "content": "Name a colour."}])
    assert prompt == ("<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                      "<start_of_turn>user\nName a colour.<end_of_turn>\n<start_of_turn>model\n")
    ids = llm.tokenizer.encode(prompt)
    assert ids.count(llm.tokenizer.bos_token_id) == 1 and ids[0] == llm.tokenizer.bos_token_id


def test_packed_file_gives_the_same_continuations_on_the_fused_and_module_paths(gemma_path):
    """The file as lmserve runs it by default (packed, every step in the fused native decoder)
    against the same weights through the PyTorch modules: equal greedy continuations."""
    runs = []
    for enforce_eager in (False, True):
        llm = LLM(str(gemma_path), kv_cache_memory="64MiB", enforce_eager=enforce_eager)
        assert (llm.engine.runner.fused_decode is None) == enforce_eager
        outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), use_tqdm=False)
        runs.append([o.outputs[0].token_ids for o in outs])
    assert runs[0] == runs[1]
