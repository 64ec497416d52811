"""lmserve's logits and greedy tokens against transformers on the same random weights."""

import copy

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.tiny_models import FAMILY_TINY_MODELS, MOE_TINY_MODELS, TINY_MODELS

PROMPT = [5, 17, 250, 3, 99, 42, 7, 7, 130, 64, 12, 300, 1, 77, 88, 150, 23, 9, 201, 11]


class LogitRecorder:
    """Wraps the engine's sampler to keep the logits it is given, one row per step."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.rows = []

    def __call__(self, logits, rows, stop_ids=None):
        self.rows.append(logits.clone())
        return self.sampler(logits, rows, stop_ids)


def hf_logits(model, token_ids):
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].float()


def assert_logits_and_greedy_tokens_match(model_path, hf_model, **engine_kwargs):
    """fp32 logits within 1e-4 of transformers at prefill and 16 decode steps, 32 greedy tokens
    identical."""
    llm = LLM(str(model_path), dtype="float32", max_num_batched_tokens=64, **engine_kwargs)
    recorder = LogitRecorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    out = llm.generate([PROMPT], SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    generated = out.outputs[0].token_ids
    assert len(generated) == 32
    reference = hf_logits(hf_model, PROMPT + generated)
    ours = torch.cat(recorder.rows)  # row i predicts the token after PROMPT + generated[:i]
    n = len(PROMPT)
    # prefill and 16 decode steps: fp32 logits within 1e-4
    diff = (ours[:17] - reference[n - 1: n + 16]).abs().max().item()
    assert diff <= 1e-4, f"max abs logit diff {diff}"
    # greedy: every generated token is transformers' argmax given the same prefix
    assert generated == reference[n - 1: n + 31].argmax(-1).tolist()


def assert_mixed_length_batch_greedy_tokens_match(model_path, hf_model, **engine_kwargs):
    """Prompts of different lengths generated in one batch (a small token budget chunks the long
    prompts, so prefill chunks and decode tokens share steps): each gets transformers' greedy tokens."""
    prompts = [PROMPT[:n] for n in (3, 20, 9, 14)]
    llm = LLM(str(model_path), dtype="float32", max_num_batched_tokens=16, **engine_kwargs)
    outs = llm.generate(prompts, SamplingParams(max_tokens=32, temperature=0, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        generated = out.outputs[0].token_ids
        reference = hf_logits(hf_model, prompt + generated)
        assert generated == reference[len(prompt) - 1: -1].argmax(-1).tolist(), f"prompt of {len(prompt)} tokens"


@pytest.mark.parametrize("kind", TINY_MODELS + FAMILY_TINY_MODELS + MOE_TINY_MODELS)
def test_logits_and_greedy_tokens_match_transformers(kind, tiny_model_factory):
    assert_logits_and_greedy_tokens_match(*tiny_model_factory(kind))


@pytest.mark.parametrize("kind", FAMILY_TINY_MODELS + MOE_TINY_MODELS)
def test_mixed_length_batch_matches_transformers(kind, tiny_model_factory):
    assert_mixed_length_batch_greedy_tokens_match(*tiny_model_factory(kind))


def test_sliding_window_shorter_than_prompt_matters(tiny_model_factory):
    """Guard that the Mistral case really exercises the window: without it the logits differ."""
    directory, hf_model = tiny_model_factory("mistral_sliding")
    assert hf_model.config.sliding_window < len(PROMPT)
    llm = LLM(str(directory), dtype="float32")
    for layer in llm.engine.model.attention_layers():
        layer.sliding_window = None
    recorder = LogitRecorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    reference = hf_logits(hf_model, PROMPT)[-1]
    assert (recorder.rows[0][0] - reference).abs().max().item() > 1e-3


def test_bf16_logits_close_to_transformers_bf16(tiny_model_factory):
    directory, hf_model = tiny_model_factory("llama_gqa")
    llm = LLM(str(directory), dtype="bfloat16")
    recorder = LogitRecorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    # A copy: Module.to works in place, and a bf16 round trip would change the shared fp32 model.
    reference = hf_logits(copy.deepcopy(hf_model).to(torch.bfloat16), PROMPT)[-1]
    assert (recorder.rows[0][0] - reference).abs().max().item() < 0.05


def test_sharded_safetensors_with_index(tiny_model_factory, tmp_path):
    _, hf_model = tiny_model_factory("qwen2")
    hf_model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    llm = LLM(str(tmp_path), dtype="float32")
    recorder = LogitRecorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    llm.generate([PROMPT], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    reference = hf_logits(hf_model, PROMPT)[-1]
    assert (recorder.rows[0][0] - reference).abs().max().item() <= 1e-4
