"""Speculative decoding with n-gram prompt lookup: the proposer, greedy outputs equal to plain
decoding (batched, chunked, preempted, stop strings, logprobs), sampled outputs that follow the
target's distribution (chi-square on a model whose next-token distribution is known exactly), KV
blocks given back after rejections, and the options' validation."""

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from lmserve import LLM, SamplingParams
from lmserve.engine.speculative import NgramProposer
from lmserve.errors import InvalidParameterError

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "ngram_max": 3, "ngram_min": 1, "max_verify_rows": 128}
# token-id prompts with repeated stretches, so that lookups find continuations
PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 5, 6, 7, 8, 9], [40, 41, 42, 40, 41, 42, 40, 41], list(range(60, 90)) * 2,
           [100, 101, 102, 103]]


def test_ngram_proposer_copies_after_the_latest_earlier_occurrence():
    proposer = NgramProposer(ngram_min=1, ngram_max=3)
    assert proposer.lookup([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 3) == [7, 5, 1]
    assert proposer.lookup([1, 2, 3, 4], 2) == []  # no earlier occurrence of any suffix
    assert proposer.lookup([4, 1, 2, 4], 5) == [1, 2, 4]  # n = 1 fallback, cut at the end


def _greedy(llm, params):
    return [(o.outputs[0].token_ids, o.outputs[0].text) for o in llm.generate(PROMPTS, params, use_tqdm=False)]


@pytest.mark.parametrize("options", [{}, {"max_num_batched_tokens": 8}, {"num_kv_blocks": 24, "block_size": 4}],
                         ids=["batched", "chunked-budget", "preempting"])
def test_greedy_output_equals_plain_decoding(tiny_model_factory, options):
    directory, _ = tiny_model_factory("llama_gqa")
    params = SamplingParams(max_tokens=24, temperature=0, logprobs=2, ignore_eos=True)
    plain = LLM(str(directory), dtype="float32", **options)
    spec = LLM(str(directory), dtype="float32", speculative=NGRAM, **options)
    expected, got = _greedy(plain, params), _greedy(spec, params)
    assert got == expected
    stats = spec.engine.stats().spec
    assert stats.num_accepted > 0 and stats.num_proposed > stats.num_accepted  # both outcomes exercised
    assert spec.engine.block_manager.num_used_blocks == 0
    if "num_kv_blocks" in options:
        assert spec.engine.scheduler.num_preemptions > 0
    # logprobs of the same tokens; a multi-token verification step rounds differently from a decode step
    got_lp = spec.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].logprobs
    expected_lp = plain.generate(PROMPTS[:1], params, use_tqdm=False)[0].outputs[0].logprobs
    assert [list(e) for e in got_lp] == [list(e) for e in expected_lp]
    flat = [[v for e in entries for v in e.values()] for entries in (got_lp, expected_lp)]
    assert flat[0] == pytest.approx(flat[1], abs=1e-4)


@pytest.mark.parametrize("kind", ["llama_gqa", "mistral_sliding"])
def test_fused_verification_equals_plain_decoding(tiny_model_factory, kind):
    """Packed weights: verification steps run through the fused native decoder (1 + k rows per
    sequence sharing its block table), including a sliding window shorter than the context."""
    directory, _ = tiny_model_factory(kind)
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    plain = LLM(str(directory), quantization="int8", kv_cache_memory="16MiB")
    spec = LLM(str(directory), quantization="int8", kv_cache_memory="16MiB", speculative=NGRAM)
    if spec.engine.runner.fused_decode is None:
        pytest.skip("the fused native decoder is unavailable here")
    assert _greedy(spec, params) == _greedy(plain, params)
    assert spec.engine.stats().spec.num_accepted > 0


def test_opt_out_and_stop_token_inside_accepted_proposals(tiny_model_factory):
    directory, _ = tiny_model_factory("llama_gqa")
    plain = LLM(str(directory), dtype="float32")
    spec = LLM(str(directory), dtype="float32", speculative=NGRAM)
    reference = plain.generate(PROMPTS[2], SamplingParams(max_tokens=20, temperature=0, ignore_eos=True),
                               use_tqdm=False)[0].outputs[0].token_ids
    stop = reference[5]  # a token that the greedy run emits, likely inside an accepted run
    for params in (SamplingParams(max_tokens=20, temperature=0, stop_token_ids=[stop], ignore_eos=True),
                   SamplingParams(max_tokens=20, temperature=0, ignore_eos=True, speculative=False)):
        expected = plain.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
        got = spec.generate(PROMPTS[2], params, use_tqdm=False)[0].outputs[0]
        assert (got.token_ids, got.finish_reason) == (expected.token_ids, expected.finish_reason)
    assert spec.engine.block_manager.num_used_blocks == 0


@pytest.fixture(scope="module")
def context_free_model(tmp_path_factory):
    """A GPT-2 whose final LayerNorm has weight 0: every position's hidden state is its bias b, so
    the next-token distribution is softmax(E b) whatever the context, known exactly. b is chosen
    so a handful of tokens carry most of the mass (proposals are then often right, often wrong)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=32, n_embd=16, n_layer=1, n_head=2, n_positions=128,
                                       bos_token_id=None, eos_token_id=None)).eval()
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.randn(16))
        favoured = torch.tensor([3, 4, 5, 6])
        model.transformer.wte.weight[favoured] += 1.5 * model.transformer.ln_f.bias / model.transformer.ln_f.bias.norm()
        logits = (model.transformer.wte.weight @ model.transformer.ln_f.bias).double()
    directory = tmp_path_factory.mktemp("context_free")
    model.save_pretrained(directory)
    return directory, logits


def _target(logits: torch.Tensor, temperature: float, top_k: int) -> np.ndarray:
    scaled = logits / temperature
    if top_k:
        scaled = scaled.masked_fill(scaled < scaled.topk(top_k).values[-1], float("-inf"))
    return torch.softmax(scaled, dim=0).numpy()


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.7, 5)])
def test_sampled_tokens_follow_the_target_distribution(context_free_model, temperature, top_k):
    directory, logits = context_free_model
    llm = LLM(str(directory), dtype="float32", speculative={**NGRAM, "max_verify_rows": 1024}, max_num_seqs=64)
    prompt = [3, 4, 5, 6, 3, 4, 5, 3, 4, 6, 5, 3, 4]
    params = [SamplingParams(max_tokens=24, temperature=temperature, top_k=top_k, seed=i, ignore_eos=True)
              for i in range(64)]
    outputs = llm.generate([prompt] * 64, params, use_tqdm=False)
    # the first token comes from the prefill step; the rest from verification steps
    tokens = np.array([t for o in outputs for t in o.outputs[0].token_ids[1:]])
    stats = llm.engine.stats().spec
    assert stats.num_accepted > 200 and stats.num_proposed - stats.num_accepted > 200
    expected = _target(logits, temperature, top_k) * len(tokens)
    support = expected > 0
    assert np.all(np.bincount(tokens, minlength=32)[~support] == 0)
    observed = np.bincount(tokens, minlength=32)[support]
    assert chisquare(observed, expected[support]).pvalue > 1e-3


def test_seeded_sampling_does_not_depend_on_the_batch(context_free_model):
    directory, _ = context_free_model
    llm = LLM(str(directory), dtype="float32", speculative=NGRAM)
    params = SamplingParams(max_tokens=16, temperature=1.0, seed=7, ignore_eos=True)
    alone = llm.generate([[3, 4, 5, 3, 4]], params, use_tqdm=False)[0].outputs[0].token_ids
    batch = llm.generate([[3, 4, 5, 3, 4], [6, 5, 4, 6], [3, 3, 3]], [params, SamplingParams(max_tokens=9, seed=1),
                                                                      SamplingParams(max_tokens=5, temperature=0)],
                         use_tqdm=False)
    assert batch[0].outputs[0].token_ids == alone


@pytest.mark.parametrize("options,field", [({"method": "eagle"}, "speculative.method"),
                                           ({"num_speculative_tokens": 0}, "speculative.num_speculative_tokens"),
                                           ({"ngram_min": 5, "ngram_max": 2}, "speculative.ngram_min"),
                                           ({"draft": "x"}, "speculative")])
def test_bad_options_name_the_field(tiny_model_factory, options, field):
    directory, _ = tiny_model_factory("llama_gqa")
    with pytest.raises(InvalidParameterError) as info:
        LLM(str(directory), speculative=options)
    assert info.value.field == field


def test_smollm2_repeating_a_paragraph_accepts_most_proposals(smollm2_path):
    text = ("The river rises in the hills, runs through the old town and reaches the sea after forty miles. "
            "Fishermen mend their nets on its banks every morning.")
    chat = [[{"role": "user", "content": f"Repeat this paragraph exactly:\n{text}"}]]
    params = SamplingParams(max_tokens=48, temperature=0)
    plain = LLM(str(smollm2_path), kv_cache_memory="32MiB").chat(chat, params, use_tqdm=False)[0].outputs[0]
    spec_llm = LLM(str(smollm2_path), kv_cache_memory="32MiB", speculative=NGRAM)
    spec = spec_llm.chat(chat, params, use_tqdm=False)[0].outputs[0]
    assert spec.token_ids == plain.token_ids
    assert spec_llm.engine.stats().spec.acceptance_rate > 0.5


def test_server_honours_the_opt_out_and_reports_acceptance(smollm2_path):
    """A real server with speculation on: the `speculative` request field (false opts out) and the
    /metrics gauges, through the official openai client."""
    import openai
    import httpx

    from lmserve.server import build_app
    from tests.test_server import running

    app = build_app({"model": str(smollm2_path), "kv_cache_memory": "32MiB", "speculative": NGRAM}, "m")
    with running(app) as base:
        client = openai.OpenAI(base_url=f"{base}/v1", api_key="none")
        prompt = "Repeat exactly: one two three four five, one two three four five, one two three"
        answers = [client.completions.create(model="m", prompt=prompt, max_tokens=24, temperature=0,
                                             extra_body={"speculative": opt}).choices[0].text for opt in (False, True)]
        assert answers[0] == answers[1]
        metrics = httpx.get(f"{base}/metrics").text
    rate = float(next(line.split()[-1] for line in metrics.splitlines()
                      if line.startswith("lmserve_spec_decode_acceptance_rate ")))
    assert 0 < rate <= 1
