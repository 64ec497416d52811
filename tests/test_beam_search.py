"""Beam search and forked samples on tiny random models, against transformers on the same
weights: width 1 is greedy, width 4 finds a sequence at least as likely as greedy's, and the k
hypotheses equal transformers' `generate(num_beams=k, num_return_sequences=k)` with and without
EOS, with length penalties 1.0 and 0.5. n > 1 and best_of share the prompt's blocks, copying
only the partial block each sample writes into."""

import json
import shutil

import pytest
import torch

from lmserve import LLM, BeamSearchParams, SamplingParams
from lmserve.errors import InvalidParameterError

PROMPTS = [[5, 17, 33, 2, 99, 140, 7], [(13 * j) % 311 + 3 for j in range(14)]]


@pytest.fixture(scope="module")
def tiny(tiny_model_factory):
    directory, hf_model = tiny_model_factory("llama_gqa")
    return LLM(str(directory), dtype="float32", quantization="none", block_size=4), hf_model


def _transformers_beams(hf_model, prompt, width, max_tokens, length_penalty, eos=None, early_stopping=False):
    out = hf_model.generate(torch.tensor([prompt]), num_beams=width, num_return_sequences=width, do_sample=False,
                            max_new_tokens=max_tokens, length_penalty=length_penalty, early_stopping=early_stopping,
                            eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
                            output_scores=True, return_dict_in_generate=True)
    beams = []
    for row, score in zip(out.sequences, out.sequences_scores):
        tokens = row[len(prompt):].tolist()
        if eos is not None and eos in tokens:  # drop the padding after EOS
            tokens = tokens[: tokens.index(eos) + 1]
        beams.append((tokens, float(score)))
    return beams


def _all_free(llm):
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks


def test_width_one_is_greedy(tiny):
    llm, _ = tiny
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=1, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for g, b in zip(greedy, beams):
        (best,) = b.sequences
        assert best.token_ids == g.outputs[0].token_ids
        assert best.cum_logprob == pytest.approx(g.outputs[0].cumulative_logprob, abs=1e-4)
    assert _all_free(llm)


def test_width_four_is_at_least_as_likely_as_greedy(tiny):
    llm, _ = tiny
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False)
    beams = llm.beam_search(PROMPTS, BeamSearchParams(beam_width=4, max_tokens=12, ignore_eos=True), use_tqdm=False)
    for g, b in zip(greedy, beams):
        assert len(b.sequences) == 4
        assert b.sequences[0].cum_logprob >= g.outputs[0].cumulative_logprob - 1e-5
        scores = [s.score for s in b.sequences]
        assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("length_penalty", [1.0, 0.5])
def test_matches_transformers_without_eos(tiny, length_penalty):
    llm, hf_model = tiny
    params = BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=length_penalty, ignore_eos=True)
    for prompt, out in zip(PROMPTS, llm.beam_search(PROMPTS, params, use_tqdm=False)):
        expected = _transformers_beams(hf_model, prompt, 4, 10, length_penalty)
        assert [s.token_ids for s in out.sequences] == [tokens for tokens, _ in expected]
        assert [s.score for s in out.sequences] == pytest.approx([score for _, score in expected], abs=1e-4)
    assert _all_free(llm)


@pytest.fixture(scope="module")
def tiny_with_eos(tiny_model_factory, tmp_path_factory, tiny):
    """The same weights with an EOS id chosen among greedy's early tokens, so beams do end."""
    llm, hf_model = tiny
    greedy = llm.generate(PROMPTS, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True), use_tqdm=False)
    eos = greedy[0].outputs[0].token_ids[3]
    directory = tmp_path_factory.mktemp("llama_eos")
    source, _ = tiny_model_factory("llama_gqa")
    shutil.copytree(source, directory, dirs_exist_ok=True)
    config = json.loads((directory / "config.json").read_text())
    config["eos_token_id"] = eos
    (directory / "config.json").write_text(json.dumps(config))
    return LLM(str(directory), dtype="float32", quantization="none", block_size=4), hf_model, eos


@pytest.mark.parametrize("length_penalty,early_stopping", [(1.0, False), (0.5, False), (1.0, True)])
def test_matches_transformers_with_eos(tiny_with_eos, length_penalty, early_stopping):
    llm, hf_model, eos = tiny_with_eos
    assert eos in llm.engine.stop_token_ids
    params = BeamSearchParams(beam_width=4, max_tokens=10, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    outs = llm.beam_search(PROMPTS, params, use_tqdm=False)
    assert any(s.token_ids[-1] == eos and s.finish_reason == "stop" for s in outs[0].sequences)
    for prompt, out in zip(PROMPTS, outs):
        expected = _transformers_beams(hf_model, prompt, 4, 10, length_penalty, eos, early_stopping)
        assert [s.token_ids for s in out.sequences] == [tokens for tokens, _ in expected]
        assert [s.score for s in out.sequences] == pytest.approx([score for _, score in expected], abs=1e-4)
    assert _all_free(llm)


def test_beam_search_under_memory_pressure_matches_unconstrained(tiny_model_factory, tiny):
    llm, _ = tiny
    directory, _ = tiny_model_factory("llama_gqa")
    params = BeamSearchParams(beam_width=4, max_tokens=10, ignore_eos=True)
    expected = [[s.token_ids for s in o.sequences] for o in llm.beam_search(PROMPTS, params, use_tqdm=False)]
    for mode in ("recompute", "swap"):
        small = LLM(str(directory), dtype="float32", quantization="none", block_size=4, num_kv_blocks=14,
                    max_num_batched_tokens=8, preemption_mode=mode, swap_space=1 << 16)
        outs = small.beam_search(PROMPTS, params, use_tqdm=False)
        assert small.engine.scheduler.num_preemptions > 0
        assert [[s.token_ids for s in o.sequences] for o in outs] == expected
        assert _all_free(small)


def _max_used_blocks(llm, run):
    bm = llm.engine.block_manager
    used, copies = [], []
    engine_step, copy_blocks = llm.engine.step, llm.engine.runner.copy_blocks

    def step():
        outputs = engine_step()
        used.append(bm.num_used_blocks)
        return outputs

    def counting_copy(pairs):
        copies.extend(pairs)
        copy_blocks(pairs)

    llm.engine.step, llm.engine.runner.copy_blocks = step, counting_copy
    try:
        result = run()
    finally:
        llm.engine.step, llm.engine.runner.copy_blocks = engine_step, copy_blocks
    return result, max(used), len(copies)


@pytest.mark.parametrize("n,best_of", [(4, None), (2, 4)])
def test_samples_share_the_prompt_blocks(tiny_model_factory, n, best_of):
    directory, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(directory), dtype="float32", quantization="none", block_size=4, enable_prefix_caching=False)
    prompt = PROMPTS[1]  # 14 tokens: 3 full blocks and a partial one
    params = SamplingParams(n=n, best_of=best_of, max_tokens=3, temperature=1.0, seed=7, ignore_eos=True)
    out, max_used, num_copies = _max_used_blocks(llm, lambda: llm.generate([prompt], params, use_tqdm=False)[0])
    samples = best_of or n
    # Each sample computes positions 0..15 (14 prompt + 2 generated; the 3rd is only sampled):
    # 3 shared full blocks, plus its own copy of the partial block.
    assert max_used == 3 + samples and num_copies == samples - 1
    assert max_used < samples * 4
    assert len(out.outputs) == n and [c.index for c in out.outputs] == list(range(n))
    if best_of:
        alone = llm.generate([prompt], SamplingParams(n=best_of, max_tokens=3, temperature=1.0, seed=7,
                                                      ignore_eos=True), use_tqdm=False)[0]
        ranked = sorted(alone.outputs, key=lambda c: c.cumulative_logprob, reverse=True)[:n]
        assert [c.token_ids for c in out.outputs] == [c.token_ids for c in ranked]
    assert _all_free(llm)


def test_bad_beam_parameters_are_refused(tiny):
    llm, _ = tiny
    with pytest.raises(InvalidParameterError, match="beam_width"):
        BeamSearchParams(beam_width=0)
    with pytest.raises(InvalidParameterError, match="early_stopping"):
        BeamSearchParams(beam_width=2, early_stopping="sometimes")
    with pytest.raises(InvalidParameterError, match="best_of"):
        SamplingParams(n=3, best_of=2)
    with pytest.raises(InvalidParameterError, match="beam_width"):
        llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=100), use_tqdm=False)


def test_server_returns_the_beams_as_choices(tiny_model_factory, tiny):
    import httpx

    from lmserve.server.app import build_app
    from tests.test_server import running

    llm, _ = tiny
    directory, _ = tiny_model_factory("llama_gqa")
    expected = llm.beam_search(PROMPTS[0], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True),
                               use_tqdm=False)[0]
    served = LLM(str(directory), dtype="float32", quantization="none", block_size=4)
    with running(build_app(served.engine, "tiny")) as url:
        body = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 6, "n": 3, "use_beam_search": True,
                "ignore_eos": True}
        response = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
        defaulted = httpx.post(f"{url}/v1/completions", json={**body, "max_tokens": None}, timeout=60)
    assert response.status_code == 200, response.text
    choices = response.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1, 2]
    assert [c["text"] for c in choices] == [s.text for s in expected.sequences]
    assert [c["finish_reason"] for c in choices] == [s.finish_reason for s in expected.sequences]
    assert response.json()["usage"]["completion_tokens"] == sum(len(s.token_ids) for s in expected.sequences)
    # null is OpenAI's default (16 tokens), as for any completion
    assert defaulted.status_code == 200 and defaulted.json()["usage"]["completion_tokens"] == 3 * 16
