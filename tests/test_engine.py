"""End-to-end engine behaviour on the embedded SmolLM2-135M-Instruct GGUF: batch invariance,
seeded sampling, stop conditions, streaming, preemption, KV-block accounting and limits."""

import pytest

from lmserve import LLM, SamplingParams
from lmserve.errors import ContextLengthError, InvalidParameterError
from tests.probes import used_blocks_per_step

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "1, 2, 3, 4,",
    "def fibonacci(n):",
    "Once upon a time, in a small village at the edge of a great forest, there lived",
    "Q: What is the boiling point of water in Celsius?\nA:",
    "Translate to French: good morning",
    "Les élèves étudient 日本語 and emoji 🎉 because",
]


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), deterministic=True, max_num_seqs=16)


def _all_free(llm):
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks


def _texts(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_batch_equals_each_prompt_alone(llm):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    together = _texts(llm.generate(PROMPTS, params, use_tqdm=False))
    alone = [_texts(llm.generate([p], params, use_tqdm=False))[0] for p in PROMPTS]
    assert together == alone
    assert _all_free(llm)


def test_seeded_sampling_is_batch_invariant_and_reproducible(llm):
    params = SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95, top_k=50, seed=1234, ignore_eos=True)
    together = _texts(llm.generate(PROMPTS[:4], params, use_tqdm=False))
    alone = [_texts(llm.generate([p], params, use_tqdm=False))[0] for p in PROMPTS[:4]]
    assert together == alone
    other_seed = _texts(llm.generate(PROMPTS[:4], SamplingParams(max_tokens=16, temperature=0.9, top_p=0.95,
                                                                  top_k=50, seed=99, ignore_eos=True),
                                     use_tqdm=False))
    assert other_seed != together
    assert _all_free(llm)


def test_preemption_under_memory_pressure_keeps_greedy_outputs(smollm2_path, llm):
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    reference = _texts(llm.generate(PROMPTS, params, use_tqdm=False))
    small = LLM(str(smollm2_path), deterministic=True, num_kv_blocks=12, block_size=16, max_num_batched_tokens=64)
    outputs = _texts(small.generate(PROMPTS, params, use_tqdm=False))
    assert small.engine.scheduler.num_preemptions > 0
    assert outputs == reference
    assert _all_free(small)


def test_stop_string_spanning_tokens_is_cut_and_not_emitted(llm):
    base = llm.generate("Once upon a time", SamplingParams(max_tokens=30, temperature=0), use_tqdm=False)[0]
    text = base.outputs[0].text
    stop = text[10:16]
    assert len(stop.strip()) > 2
    out = llm.generate("Once upon a time", SamplingParams(max_tokens=30, temperature=0, stop=[stop]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    assert _all_free(llm)


def test_stop_token_ids_and_length_finish(llm):
    base = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
                        use_tqdm=False)[0].outputs[0]
    assert base.finish_reason == "length" and len(base.token_ids) == 8
    target = base.token_ids[3]
    out = llm.generate("1, 2, 3, 4,", SamplingParams(max_tokens=8, temperature=0, stop_token_ids=[target]),
                       use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == target
    assert out.token_ids == base.token_ids[: base.token_ids.index(target) + 1]


def test_chat_reply_stops_at_end_of_turn(llm):
    out = llm.chat([{"role": "user", "content": "Say hello in one word."}],
                   SamplingParams(max_tokens=64, temperature=0), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] in llm.tokenizer.stop_token_ids
    assert "<|im_end|>" not in out.text and out.text.strip()


def test_streamed_deltas_equal_final_text(llm):
    params = SamplingParams(max_tokens=40, temperature=0)
    deltas, final = [], None
    for step in llm.stream(PROMPTS[-1], params):
        deltas.append(step.outputs[0].delta_text)
        final = step
    assert "".join(deltas) == final.outputs[0].text
    assert len(deltas) > 5
    assert final.metrics.time_to_first_token > 0 and final.metrics.time_per_output_token > 0
    assert _all_free(llm)


def test_n_samples_and_logprobs(llm):
    out = llm.generate("Tell me a story:", SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=5,
                                                          logprobs=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs) == 3
    assert len({tuple(o.token_ids) for o in out.outputs}) > 1
    for o in out.outputs:
        assert len(o.logprobs) == len(o.token_ids)
        for token, entry in zip(o.token_ids, o.logprobs):
            assert token in entry and 3 <= len(entry) <= 4
            assert all(v <= 0 for v in entry.values())
        assert o.cumulative_logprob == pytest.approx(sum(e[t] for t, e in zip(o.token_ids, o.logprobs)), abs=1e-3)


def test_token_id_prompts_and_text_prompts_agree(llm):
    ids = llm.tokenizer.encode("The capital of France is")
    params = SamplingParams(max_tokens=8, temperature=0)
    assert _texts(llm.generate([ids], params, use_tqdm=False)) == \
        _texts(llm.generate("The capital of France is", params, use_tqdm=False))


def test_context_limit_is_enforced_with_both_numbers(smollm2_path):
    small = LLM(str(smollm2_path), deterministic=True, max_model_len=64)
    with pytest.raises(ContextLengthError) as err:
        small.generate("word " * 60, SamplingParams(max_tokens=10), use_tqdm=False)
    assert "64" in str(err.value) and "10" in str(err.value)
    assert _all_free(small)
    prompt = small.tokenizer.encode("word " * 60)
    out = small.generate([prompt], SamplingParams(max_tokens=10, temperature=0, truncate_prompt_tokens=50),
                         use_tqdm=False)[0]
    assert out.prompt_token_ids == prompt[-50:] and len(out.outputs[0].token_ids) == 10


def test_bad_prompts_are_refused(llm):
    with pytest.raises(InvalidParameterError, match="prompt"):
        llm.generate([""], use_tqdm=False)
    with pytest.raises(InvalidParameterError, match="outside the vocabulary"):
        llm.generate([[1, 2, 10**9]], use_tqdm=False)
    assert _all_free(llm) and not llm.engine.has_unfinished_requests()


def test_out_of_vocabulary_ids_in_parameters_are_refused(llm):
    with pytest.raises(InvalidParameterError, match="stop_token_ids"):
        llm.generate("hi", SamplingParams(stop_token_ids=[10**7]), use_tqdm=False)
    with pytest.raises(InvalidParameterError, match="logit_bias"):
        llm.generate("hi", SamplingParams(logit_bias={10**7: 5.0}), use_tqdm=False)


def test_logit_bias_forces_a_token(llm):
    target = llm.tokenizer.encode(" banana")[0]
    out = llm.generate("The capital of France is", SamplingParams(max_tokens=3, temperature=0,
                                                                  logit_bias={target: 100.0}),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [target] * 3


def test_prefix_cache_hits_and_gives_the_same_tokens(smollm2_path, llm):
    system = "You are a helpful assistant who answers questions about geography in detail. " * 3
    prompts = [system + q for q in ("Where is Peru?", "Where is Chad?", "Where is Laos?")]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    uncached = LLM(str(smollm2_path), deterministic=True, enable_prefix_caching=False)
    expected = _texts(uncached.generate(prompts, params, use_tqdm=False))
    assert uncached.engine.block_manager.prefix_cache_hit_rate == 0
    bm = llm.engine.block_manager
    hits_before = bm.prefix_hits
    first = _texts(llm.generate(prompts[:1], params, use_tqdm=False))
    rest = _texts(llm.generate(prompts[1:], params, use_tqdm=False))
    assert first + rest == expected
    ids = [llm.tokenizer.encode(p) for p in prompts]
    shared = next(i for i, (a, b) in enumerate(zip(ids[0], ids[1])) if a != b)
    assert shared >= 32
    # each later prompt reused every full block of the shared prefix
    assert bm.prefix_hits - hits_before == 2 * (shared // 16) * 16
    assert _all_free(llm)


def test_prompt_longer_than_the_step_budget_is_chunked(smollm2_path, llm):
    prompt = PROMPTS[4] * 4
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    chunked = LLM(str(smollm2_path), deterministic=True, max_num_batched_tokens=16, enable_prefix_caching=False)
    assert len(chunked.tokenizer.encode(prompt)) > 3 * 16
    assert _texts(chunked.generate([prompt, PROMPTS[0]], params, use_tqdm=False)) == \
        _texts(llm.generate([prompt, PROMPTS[0]], params, use_tqdm=False))


def test_prompt_filling_the_context_is_refused_without_max_tokens(smollm2_path):
    small = LLM(str(smollm2_path), deterministic=True, max_model_len=32)
    with pytest.raises(ContextLengthError, match="32"):
        small.generate("word " * 40, SamplingParams(max_tokens=None), use_tqdm=False)
    out = small.generate("Hello", SamplingParams(max_tokens=None, temperature=0, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.prompt_token_ids) + len(out.outputs[0].token_ids) == 32


def test_n_samples_share_the_prompt_blocks(llm):
    prompt = PROMPTS[4] * 2
    num_prompt = len(llm.tokenizer.encode(prompt))
    with used_blocks_per_step(llm) as used:
        outs = llm.generate(prompt, SamplingParams(n=4, max_tokens=4, temperature=0.8, seed=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs
    full, total_tokens = num_prompt // 16, num_prompt + 4
    own = -(-total_tokens // 16) - full  # blocks each sample needs beyond the shared full prompt blocks
    assert max(used) <= full + 4 * own < 4 * -(-total_tokens // 16)
    assert len(outs) == 4 and all(len(o.token_ids) == 4 for o in outs)
    assert _all_free(llm)
