"""Speculative decoding with a draft model: greedy outputs equal plain decoding (batched,
chunked, preempted), sampled outputs follow the target's distribution when the draft's differs
strongly (chi-square, exact rejection sampling), seeded outputs do not depend on the batch, the
draft's KV blocks are all given back, and a draft with another vocabulary is refused."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from lmserve import LLM, SamplingParams
from lmserve.errors import InvalidParameterError

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9], [40, 41, 42, 40, 41, 42, 40, 41], list(range(60, 90)) * 2,
           [100, 101, 102, 103]]


def _draft(directory, k=4, **extra):
    return {"method": "draft", "model": str(directory), "num_speculative_tokens": k, "max_verify_rows": 1024, **extra}


def _draft_blocks(llm) -> int:
    return llm.engine.speculator.proposer.block_manager.num_used_blocks


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 8}, {"num_kv_blocks": 24, "block_size": 4}],
                         ids=["batched", "chunked-budget", "preempting"])
def test_greedy_output_with_a_draft_equals_plain_decoding(tiny_model_factory, options):
    target, _ = tiny_model_factory("llama_gqa")
    draft, _ = tiny_model_factory("llama_mqa_tied")  # another model on the same 320-token vocabulary
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)
    plain = LLM(str(target), dtype="float32", kv_cache_memory="64MiB", **options)
    spec = LLM(str(target), dtype="float32", kv_cache_memory="64MiB", speculative=_draft(draft), **options)
    expected = [o.outputs[0].token_ids for o in plain.generate(PROMPTS, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in spec.generate(PROMPTS, params, use_tqdm=False)]
    assert got == expected
    stats = spec.engine.stats().spec
    assert stats.num_proposed > stats.num_accepted  # rejections happened
    assert spec.engine.block_manager.num_used_blocks == 0 and _draft_blocks(spec) == 0
    if "num_kv_blocks" in options:
        assert spec.engine.scheduler.num_preemptions > 0


def test_the_same_model_as_its_own_draft_accepts_everything(tiny_model_factory):
    target, _ = tiny_model_factory("llama_gqa")
    spec = LLM(str(target), dtype="float32", kv_cache_memory="64MiB", speculative=_draft(target))
    spec.generate(PROMPTS, SamplingParams(max_tokens=16, temperature=0, ignore_eos=True), use_tqdm=False)
    stats = spec.engine.stats().spec
    assert stats.num_proposed > 20 and stats.num_accepted == stats.num_proposed


def _context_free(directory, favoured: list[int], seed: int):
    """A GPT-2 whose final LayerNorm has weight 0, so its next-token distribution is softmax(E b)
    at every position (known exactly); `favoured` tokens carry most of the mass."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                       bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():
        bias = model.transformer.ln_f.bias
        model.transformer.ln_f.weight.zero_()
        bias.copy_(torch.randn(16))
        model.transformer.wte.weight[torch.tensor(favoured)] += 1.5 * bias / bias.norm()
        logits = (model.transformer.wte.weight @ bias).double()
    model.save_pretrained(directory)
    return logits


@pytest.fixture(scope="module")
def target_and_draft(tmp_path_factory):
    target_dir, draft_dir = tmp_path_factory.mktemp("cf_target"), tmp_path_factory.mktemp("cf_draft")
    target_logits = _context_free(target_dir, [3, 4, 5, 6], seed=0)
    draft_logits = _context_free(draft_dir, [5, 6, 7, 8, 9], seed=1)
    return target_dir, draft_dir, target_logits, draft_logits


def _distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float = 1.0) -> np.ndarray:
    scaled = logits / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    probs = torch.softmax(scaled, dim=0)
    if top_p < 1.0:  # keep the smallest most-likely set whose mass reaches top_p
        ordered, order = probs.sort(descending=True)
        keep = (torch.cumsum(ordered, 0) - ordered) < top_p
        probs = torch.zeros_like(probs).scatter_(0, order[keep], ordered[keep])
        probs /= probs.sum()
    return probs.numpy()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.0, 0, 0.8)])
def test_sampled_tokens_follow_the_target_not_the_draft(target_and_draft, temperature, top_k, top_p):
    target_dir, draft_dir, target_logits, draft_logits = target_and_draft
    p = _distribution(target_logits, temperature, top_k, top_p)
    q = _distribution(draft_logits, temperature, top_k, top_p)
    assert 0.5 * np.abs(p - q).sum() > 0.3  # the draft really is a different distribution
    llm = LLM(str(target_dir), dtype="float32", kv_cache_memory="64MiB", speculative=_draft(draft_dir), max_num_seqs=64)
    params = [SamplingParams(max_tokens=24, temperature=temperature, top_k=top_k, top_p=top_p, seed=i,
                             ignore_eos=True) for i in range(64)]
    outputs = llm.generate([[3, 4, 5]] * 64, params, use_tqdm=False)
    tokens = np.array([t for o in outputs for t in o.outputs[0].token_ids[1:]])  # [0] is the prefill's
    stats = llm.engine.stats().spec
    assert stats.num_accepted > 200 and stats.num_proposed - stats.num_accepted > 200
    expected = p * len(tokens)
    support = expected > 0
    counts = np.bincount(tokens, minlength=32)
    assert np.all(counts[~support] == 0)
    assert chisquare(counts[support], expected[support]).pvalue > 1e-3
    assert _draft_blocks(llm) == 0


def test_seeded_sampling_with_a_draft_does_not_depend_on_the_batch(target_and_draft):
    target_dir, draft_dir, _, _ = target_and_draft
    llm = LLM(str(target_dir), dtype="float32", kv_cache_memory="64MiB", speculative=_draft(draft_dir))
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    alone = llm.generate([[3, 4, 5, 3, 4]], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate([[3, 4, 5, 3, 4], [6, 5, 4, 6], [3, 3, 3]],
                         [params, SamplingParams(max_tokens=9, seed=1), SamplingParams(max_tokens=5, temperature=0)],
                         use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone


def test_aborted_requests_give_back_the_drafts_blocks(tiny_model_factory):
    target, _ = tiny_model_factory("llama_gqa")
    draft, _ = tiny_model_factory("llama_mqa_tied")
    llm = LLM(str(target), dtype="float32", kv_cache_memory="64MiB", speculative=_draft(draft))
    engine = llm.engine
    ids = [engine.add_request(prompt, SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))
           for prompt in PROMPTS]
    for _ in range(3):
        engine.step()
    assert _draft_blocks(llm) > 0
    for request_id in ids:
        engine.abort_request(request_id)
    assert _draft_blocks(llm) == 0 and engine.block_manager.num_used_blocks == 0


def test_a_draft_with_another_vocabulary_is_refused(tiny_model_factory, target_and_draft):
    target, _ = tiny_model_factory("llama_gqa")
    _, draft_dir, _, _ = target_and_draft
    with pytest.raises(InvalidParameterError, match="32 entries.*320") as info:
        LLM(str(target), speculative=_draft(draft_dir))
    assert info.value.field == "speculative.model"
    with pytest.raises(InvalidParameterError) as info:
        LLM(str(target), speculative={"method": "draft"})
    assert info.value.field == "speculative.model"


def test_a_draft_stays_off_when_the_row_cap_leaves_too_few_proposals(tiny_model_factory):
    """Default cap of 16 verification rows: 2 sequences get 4 proposals each, 8 would get 1 each,
    which costs more than it saves (DRAFT_MIN_PROPOSALS), so they get none."""
    target, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(target), dtype="float32", kv_cache_memory="64MiB", speculative={"method": "draft", "model": str(target)})
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    llm.generate([[5, 6, 7]] * 8, params, use_tqdm=False)
    assert llm.engine.stats().spec.num_proposed == 0
    llm.generate([[5, 6, 7]] * 2, params, use_tqdm=False)
    assert llm.engine.stats().spec.num_proposed > 0


def test_sampled_n_with_penalties_reports_the_models_own_logprobs(tiny_model_factory):
    """n = 2 samples with a repetition penalty and stop strings through draft verification: the
    logprob reported for each token (also those drawn from the residual on rejection) is the
    target model's raw log-probability of it, as scoring the same tokens gives."""
    target, _ = tiny_model_factory("llama_gqa")
    draft, _ = tiny_model_factory("llama_mqa_tied")
    llm = LLM(str(target), dtype="float32", kv_cache_memory="64MiB", speculative=_draft(draft))
    params = SamplingParams(n=2, max_tokens=20, temperature=0.9, seed=5, repetition_penalty=1.3, logprobs=1,
                            ignore_eos=True)
    prompt = PROMPTS[0]
    output = llm.generate([prompt], params, use_tqdm=False)[0]
    stats = llm.engine.stats().spec
    assert len(output.outputs) == 2 and stats.num_proposed > stats.num_accepted > 0
    for sample in output.outputs:
        tokens = prompt + sample.token_ids
        expected = torch.log_softmax(llm.engine.score(tokens), dim=-1)
        for i, token in enumerate(sample.token_ids):
            assert sample.logprobs[i][token] == pytest.approx(float(expected[len(prompt) - 1 + i, token]), abs=1e-4)
    assert _draft_blocks(llm) == 0


def test_a_dropped_engine_is_freed_without_waiting_for_the_garbage_collector(tiny_model_factory):
    """No reference cycle through the engine: its KV caches (target's and draft's) go as soon as
    the last reference does, which is what keeps a test session's memory flat."""
    import gc
    import weakref

    target, _ = tiny_model_factory("llama_gqa")
    gc.disable()
    try:
        llm = LLM(str(target), dtype="float32", kv_cache_memory="8MiB", speculative=_draft(target))
        llm.generate(PROMPTS[:2], SamplingParams(max_tokens=8, temperature=0), use_tqdm=False)
        engine = weakref.ref(llm.engine)
        del llm
        assert engine() is None
    finally:
        gc.enable()
