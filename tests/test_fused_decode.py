"""The fused native decode step (lmserve/models/llama_fused.py) against the PyTorch modules it
replaces: same weights, same engine, decode steps run one way or the other (enforce_eager)."""

import math

import pytest

from lmserve import LLM, SamplingParams
from lmserve.quant import native

pytestmark = pytest.mark.skipif(native.load() is None, reason="the C++ extension did not build here")

# Every Llama-family variant the fused step claims: GQA, MQA + tied head, sliding window,
# q/k/v bias (Qwen2), per-head q/k norms (Qwen3), scaled rotary tables, Phi-3's LongRoPE.
MODELS = ["llama_gqa", "llama_mqa_tied", "mistral_sliding", "qwen2", "qwen3", "yarn_rope", "phi3_longrope"]


def _run(directory, quantization, enforce_eager, prompts, params):
    llm = LLM(str(directory), kv_cache_memory="16MiB", quantization=quantization, enforce_eager=enforce_eager)
    assert (llm.engine.runner.fused_decode is None) == enforce_eager
    return llm.generate(prompts, params, use_tqdm=False)


@pytest.mark.parametrize("quantization", ["int8", "int4"])
@pytest.mark.parametrize("kind", MODELS)
def test_fused_decode_matches_the_module_path(tiny_model_factory, kind, quantization):
    """Greedy tokens equal and every step's top-5 logprobs within 1e-3, for a batch of prompts of
    different lengths (the Mistral model's window of 7 is far shorter than the contexts)."""
    directory, _ = tiny_model_factory(kind)
    prompts = [list(range(3, 3 + n)) for n in (5, 19, 33)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=5)
    fused = _run(directory, quantization, False, prompts, params)
    eager = _run(directory, quantization, True, prompts, params)
    for f, e in zip(fused, eager):
        assert f.outputs[0].token_ids == e.outputs[0].token_ids
        for step_f, step_e in zip(f.outputs[0].logprobs, e.outputs[0].logprobs):
            assert step_f.keys() == step_e.keys()
            for token, value in step_e.items():
                assert math.isclose(step_f[token], value, abs_tol=1e-3), (token, step_f[token], value)


def test_fused_decode_is_off_where_it_does_not_apply(tiny_model_factory):
    """Dense weights, a quantized KV cache and deterministic mode keep the module path."""
    directory, _ = tiny_model_factory("llama_gqa")
    for options in ({"quantization": "none"}, {"quantization": "int8", "kv_cache_dtype": "int8"},
                    {"quantization": "int8", "deterministic": True}):
        llm = LLM(str(directory), kv_cache_memory="16MiB", **options)
        assert llm.engine.runner.fused_decode is None, options
    moe_directory, _ = tiny_model_factory("mixtral")
    assert LLM(str(moe_directory), kv_cache_memory="16MiB", quantization="int8").engine.runner.fused_decode is None


@pytest.mark.parametrize("preemption_mode", ["recompute", "swap"])
def test_fused_decode_under_memory_pressure_forks_and_prefix_hits(tiny_model_factory, preemption_mode):
    """The fused step reads block tables directly: with 24 blocks of 4 tokens (so sequences are
    preempted and swapped or recomputed), copy-on-write forks (n=2 from one prompt, seeded
    sampling) and a shared prompt prefix (cache hits), it gives the module path's tokens."""
    directory, _ = tiny_model_factory("mistral_sliding")
    shared = list(range(3, 23))
    prompts = [shared + [30 + i] for i in range(4)] + [list(range(50, 61))]
    params = [SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)] * 4 + [
        SamplingParams(max_tokens=20, temperature=0.8, n=2, seed=7, ignore_eos=True)]
    runs = []
    for enforce_eager in (False, True):
        llm = LLM(str(directory), quantization="int8", block_size=4, num_kv_blocks=24, enforce_eager=enforce_eager,
                  preemption_mode=preemption_mode, swap_space="1MiB")
        runs.append([[c.token_ids for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)])
    assert runs[0] == runs[1]
