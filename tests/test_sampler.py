"""SamplingParams validation and the batched Sampler: determinism, filters, penalties, logprobs."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import chisquare

from lmserve.engine.sampler import Sampler, SamplingRow, apply_filters, apply_penalties
from lmserve.errors import InvalidParameterError
from lmserve.sampling_params import SamplingParams


def row(params=None, seed=None, prompt=(), output=(), generator=None, **kwargs):
    params = params or SamplingParams(**kwargs)
    if generator is None and seed is not None:
        generator = torch.Generator().manual_seed(seed)
    return SamplingRow(params, generator, list(prompt), list(output))


# ---- SamplingParams ------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, field, allowed", [
    ({"n": 0}, "n", ">= 1"), ({"n": 1.5}, "n", ">= 1"), ({"n": "2"}, "n", ">= 1"), ({"n": True}, "n", ">= 1"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"), ({"max_tokens": "many"}, "max_tokens", ">= 1"),
    ({"min_tokens": -1}, "min_tokens", ">= 0"),
    ({"min_tokens": 5, "max_tokens": 3}, "min_tokens", "<= max_tokens (3)"),
    ({"temperature": -1}, "temperature", ">= 0"), ({"temperature": "hot"}, "temperature", ">= 0"),
    ({"temperature": float("nan")}, "temperature", ">= 0"), ({"temperature": math.inf}, "temperature", ">= 0"),
    ({"top_k": -2}, "top_k", ">= 1 (or 0 / -1 to disable)"), ({"top_k": 2.5}, "top_k", ">= 1"),
    ({"top_p": 0}, "top_p", "in (0, 1]"), ({"top_p": 1.01}, "top_p", "in (0, 1]"),
    ({"top_p": None}, "top_p", "in (0, 1]"),
    ({"min_p": -0.1}, "min_p", "in [0, 1]"), ({"min_p": 1.5}, "min_p", "in [0, 1]"),
    ({"repetition_penalty": 0}, "repetition_penalty", "> 0"),
    ({"repetition_penalty": -1.0}, "repetition_penalty", "> 0"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "in [-2, 2]"),
    ({"frequency_penalty": "x"}, "frequency_penalty", "in [-2, 2]"),
    ({"presence_penalty": -3}, "presence_penalty", "in [-2, 2]"),
    ({"seed": "abc"}, "seed", "2**63"), ({"seed": 2**64}, "seed", "2**63"), ({"seed": 1.0}, "seed", "2**63"),
    ({"stop": ""}, "stop", "empty"), ({"stop": ["a", ""]}, "stop", "empty"), ({"stop": [1]}, "stop", "string"),
    ({"stop": 3}, "stop", "string"),
    ({"stop_token_ids": [-1]}, "stop_token_ids", ">= 0"), ({"stop_token_ids": 5}, "stop_token_ids", ">= 0"),
    ({"stop_token_ids": ["x"]}, "stop_token_ids", ">= 0"),
    ({"logprobs": 21}, "logprobs", "[0, 20]"), ({"logprobs": -1}, "logprobs", "[0, 20]"),
    ({"logprobs": "5"}, "logprobs", "[0, 20]"),
    ({"logit_bias": {1: 200}}, "logit_bias", "[-100, 100]"), ({"logit_bias": {1: "x"}}, "logit_bias", "[-100, 100]"),
    ({"logit_bias": {"x": 1}}, "logit_bias", "integers >= 0"), ({"logit_bias": {-3: 1}}, "logit_bias", ">= 0"),
    ({"logit_bias": [1, 2]}, "logit_bias", "mapping"),
    ({"ignore_eos": "yes"}, "ignore_eos", "true or false"),
    ({"skip_special_tokens": 1}, "skip_special_tokens", "true or false"),
    ({"include_stop_str_in_output": None}, "include_stop_str_in_output", "true or false"),
])
def test_invalid_params_name_field_and_range(kwargs, field, allowed):
    with pytest.raises(InvalidParameterError) as err:
        SamplingParams(**kwargs)
    assert err.value.field == field
    assert str(err.value).startswith(f"{field}: ")
    assert allowed in str(err.value)


def test_error_message_format():
    with pytest.raises(InvalidParameterError, match=r"^temperature: must be a finite number >= 0, got -1.0$"):
        SamplingParams(temperature=-1)


def test_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.max_tokens, p.temperature, p.top_k, p.top_p, p.stop, p.stop_token_ids) == \
        (1, 16, 1.0, 0, 1.0, [], [])
    assert not p.greedy
    p = SamplingParams(stop="END", stop_token_ids=(7, 9), logit_bias={"12": 3, 5: -1.5}, max_tokens=None,
                       top_k=-1, top_p=1, min_p=1, temperature=2, logprobs=0, seed=-5)
    assert p.stop == ["END"] and p.stop_token_ids == [7, 9]
    assert p.logit_bias == {12: 3.0, 5: -1.5} and all(type(k) is int for k in p.logit_bias)
    assert p.max_tokens is None and isinstance(p.temperature, float)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=1e-6).greedy
    assert not SamplingParams(temperature=1e-4).greedy
    assert SamplingParams(min_tokens=3, max_tokens=None).min_tokens == 3


# ---- determinism ---------------------------------------------------------------------------------

def _draw_steps(batch_logits, rows, target, steps=6):
    sampler, tokens = Sampler(), []
    for _ in range(steps):
        tokens.append(sampler(batch_logits, rows).token_ids[target])
    return tokens


def test_same_seed_same_tokens():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(0))
    params = SamplingParams(temperature=1.3, top_k=100, top_p=0.95)
    first = _draw_steps(logits, [row(params, seed=42)], 0, steps=10)
    again = _draw_steps(logits, [row(params, seed=42)], 0, steps=10)
    other = _draw_steps(logits, [row(params, seed=43)], 0, steps=10)
    assert first == again
    assert first != other
    assert len(set(first)) > 1  # genuinely random, not stuck on one token


@pytest.mark.parametrize("position", [0, 2, 4])
def test_seeded_row_independent_of_batch(position):
    g = torch.Generator().manual_seed(1)
    vocab = 200
    target_logits = torch.randn(vocab, generator=g)
    params = SamplingParams(temperature=0.9, top_p=0.9, min_p=0.01)
    alone = _draw_steps(target_logits.unsqueeze(0), [row(params, seed=7)], 0)

    others = [row(temperature=0), row(seed=99, top_k=5), row(seed=3, temperature=2.0, repetition_penalty=1.3,
                                                             prompt=[1, 2, 3]), row(seed=5, min_p=0.2)]
    rows = others[:position] + [row(params, seed=7)] + others[position:]
    batch = torch.randn(len(rows), vocab, generator=g)
    batch[position] = target_logits
    assert _draw_steps(batch, rows, position) == alone


def test_top_k_1_and_temperature_0_are_argmax():
    logits = torch.randn(64, 1000, generator=torch.Generator().manual_seed(2))
    expected = logits.argmax(dim=-1).tolist()
    shared = torch.Generator().manual_seed(0)
    top1 = [row(temperature=1.7, top_k=1, generator=shared) for _ in range(64)]
    assert Sampler()(logits, top1).token_ids == expected
    greedy = [row(temperature=t) for t in [0.0, 1e-6] * 32]
    assert Sampler()(logits, greedy).token_ids == expected


def test_mixed_batch_greedy_rows_take_argmax():
    logits = torch.randn(6, 50, generator=torch.Generator().manual_seed(3))
    rows = [row(temperature=0) if i % 2 else row(seed=i, temperature=5.0) for i in range(6)]
    out = Sampler()(logits, rows)
    assert [out.token_ids[i] for i in (1, 3, 5)] == logits.argmax(dim=-1)[[1, 3, 5]].tolist()


# ---- distribution of samples ---------------------------------------------------------------------

LOGITS = np.array([2.0, 1.6, 1.1, 0.7, 0.2, -0.3, -1.0, -2.5])


def _softmax(x):
    e = np.exp(x - x.max())
    return e / e.sum()


def _expected(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0):
    """Reference distribution from the definitions, independent of the sampler's code."""
    probs = _softmax(LOGITS / temperature)
    order = np.argsort(-probs, kind="stable")
    keep = np.zeros(len(probs), dtype=bool)
    if top_k >= 1:
        keep[order[:top_k]] = True
    else:
        keep[:] = True
    probs = np.where(keep, probs, 0.0) / np.where(keep, probs, 0.0).sum()
    if top_p < 1.0:
        cumulative, prefix = 0.0, np.zeros_like(keep)
        for token in order:  # smallest prefix (by descending probability) with mass >= top_p
            if not keep[token]:
                continue
            prefix[token] = True
            cumulative += probs[token]
            if cumulative >= top_p:
                break
        keep &= prefix
        probs = np.where(keep, probs, 0.0) / np.where(keep, probs, 0.0).sum()
    if min_p > 0.0:
        keep &= probs >= min_p * probs.max()
        probs = np.where(keep, probs, 0.0) / np.where(keep, probs, 0.0).sum()
    return probs


@pytest.mark.parametrize("kwargs", [
    {"temperature": 0.7}, {"temperature": 1.0}, {"top_k": 3}, {"top_p": 0.8}, {"min_p": 0.2},
    {"temperature": 1.4, "top_k": 6, "top_p": 0.9, "min_p": 0.05},
])
def test_sampling_follows_renormalised_distribution(kwargs):
    draws = 20_000
    expected = _expected(**kwargs)
    generator = torch.Generator().manual_seed(1234)
    params = SamplingParams(**kwargs)
    rows = [SamplingRow(params, generator, [], []) for _ in range(draws)]
    logits = torch.tensor(LOGITS, dtype=torch.float32).expand(draws, -1)
    tokens = np.array(Sampler()(logits, rows).token_ids)
    counts = np.bincount(tokens, minlength=len(LOGITS))
    kept = expected > 0
    assert counts[~kept].sum() == 0, f"tokens outside the kept set were drawn: {counts}"
    if kept.sum() > 1:
        assert chisquare(counts[kept], draws * expected[kept]).pvalue > 1e-3


def test_zero_probability_tokens_never_drawn():
    draws, vocab = 4000, 16
    logits = torch.zeros(draws, vocab)
    logits[:, ::2] = float("-inf")
    generator = torch.Generator().manual_seed(5)
    rows = [row(temperature=50.0, generator=generator) for _ in range(draws)]
    tokens = torch.tensor(Sampler()(logits, rows).token_ids)
    assert (tokens % 2 == 1).all()
    assert len(set(tokens.tolist())) == vocab // 2


def test_filters_mark_removed_tokens_minus_inf():
    logits = torch.tensor(LOGITS[None], dtype=torch.float32)
    out = apply_filters(logits, [SamplingParams(top_k=3)])
    assert torch.isinf(out[0, 3:]).all() and torch.equal(out[0, :3], logits[0, :3])
    assert torch.allclose(apply_filters(logits, [SamplingParams(temperature=0.5)]), logits / 0.5)


# ---- penalties -----------------------------------------------------------------------------------

RAW = [2.0, -1.0, 0.5, -0.5, 3.0, 0.0]


def _penalised(params, prompt=(), output=(), stops=None):
    logits = torch.tensor([RAW])
    before = logits.clone()
    out = apply_penalties(logits, [row(params, prompt=prompt, output=output)], stops)
    assert torch.equal(logits, before)  # the raw logits are left alone (logprobs come from them)
    return out[0].tolist()


def test_repetition_penalty_hf_style():
    out = _penalised(SamplingParams(repetition_penalty=2.0), prompt=[0, 1], output=[2, 1])
    assert out == [1.0, -2.0, 0.25, -0.5, 3.0, 0.0]
    out = _penalised(SamplingParams(repetition_penalty=0.5), prompt=[4, 3, 4, 777])
    assert out == [2.0, -1.0, 0.5, -0.25, 6.0, 0.0]


def test_frequency_and_presence_penalties_count_output_only():
    out = _penalised(SamplingParams(frequency_penalty=0.5, presence_penalty=0.25), prompt=[0, 5], output=[1, 2, 2])
    assert out == pytest.approx([2.0, -1.0 - 0.5 - 0.25, 0.5 - 1.0 - 0.25, -0.5, 3.0, 0.0])
    out = _penalised(SamplingParams(frequency_penalty=-1.0), output=[3, 3, 3])
    assert out == pytest.approx([2.0, -1.0, 0.5, 2.5, 3.0, 0.0])


def test_logit_bias_added_and_out_of_vocab_ignored():
    out = _penalised(SamplingParams(logit_bias={"4": -2.5, 5: 1.0, 99: 50.0}))
    assert out == pytest.approx([2.0, -1.0, 0.5, -0.5, 0.5, 1.0])


def test_penalty_order_bias_then_repetition_then_frequency():
    params = SamplingParams(logit_bias={0: 1.0, 1: 3.0}, repetition_penalty=2.0, frequency_penalty=0.5)
    out = _penalised(params, prompt=[0], output=[1])
    # token 0: (2 + 1) / 2; token 1: (-1 + 3) / 2 - 0.5
    assert out == pytest.approx([1.5, 0.5, 0.5, -0.5, 3.0, 0.0])


def test_min_tokens_masks_stop_ids_until_reached():
    params = SamplingParams(min_tokens=2, stop_token_ids=[0], temperature=0)
    out = _penalised(params, output=[5], stops=[{4, 1000}])
    assert out[0] == out[4] == float("-inf") and out[1:4] == RAW[1:4]
    assert _penalised(params, output=[5, 5], stops=[{4}]) == RAW
    chosen = Sampler()(torch.tensor([RAW, RAW]), [row(params), row(temperature=0)], [{4}, {4}])
    assert chosen.token_ids == [2, 4]  # row 0 may not stop yet: 0 and 4 are masked, 2 is next best


def test_penalties_only_touch_rows_that_ask_for_them():
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(4))
    rows = [row(temperature=0, prompt=[1, 2], output=[3]),
            row(temperature=0, prompt=[1, 2], output=[3], repetition_penalty=1.5, presence_penalty=1.0,
                logit_bias={7: 2.0}),
            row(temperature=0, prompt=[1, 2], output=[3])]
    out = apply_penalties(logits, rows)
    assert torch.equal(out[0], logits[0]) and torch.equal(out[2], logits[2])
    assert not torch.equal(out[1], logits[1])


def test_greedy_choice_follows_penalised_logits():
    logits = torch.tensor([RAW])
    assert Sampler()(logits, [row(temperature=0)]).token_ids == [4]
    assert Sampler()(logits, [row(temperature=0, output=[4], repetition_penalty=2.0)]).token_ids == [0]
    assert Sampler()(logits, [row(temperature=0, logit_bias={3: 4.0})]).token_ids == [3]


# ---- logprobs ------------------------------------------------------------------------------------

def test_logprobs_come_from_raw_distribution():
    logits = torch.randn(5, 100, generator=torch.Generator().manual_seed(6)) * 3
    raw = logits.clone()
    rows = [row(seed=1, logprobs=5, repetition_penalty=1.5, prompt=[1, 2, 3]),
            row(temperature=0, logprobs=20, logit_bias={9: 30.0}),
            row(seed=2, temperature=0.3, top_k=4),
            row(seed=3, logprobs=0, frequency_penalty=1.0, output=[4, 4]),
            row(seed=4, logprobs=1, top_p=0.5, min_p=0.1)]
    out = Sampler()(logits, rows)
    assert torch.equal(logits, raw)
    reference = torch.log_softmax(raw.double(), dim=-1)
    assert out.token_ids[1] == 9
    for i, token in enumerate(out.token_ids):
        assert out.logprobs[i] == pytest.approx(reference[i, token].item(), abs=1e-5)
    assert out.top_logprobs[2] is None and out.top_logprobs[3] == []
    for i, n in [(0, 5), (1, 20), (4, 1)]:
        top = out.top_logprobs[i]
        assert len(top) == n
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        best = torch.topk(reference[i], n)
        assert [t for t, _ in top] == best.indices.tolist()
        assert values == pytest.approx(best.values.tolist(), abs=1e-5)
        assert all(type(t) is int for t, _ in top)


def test_output_types_and_shape_check():
    out = Sampler()(torch.randn(2, 10), [row(temperature=0), row(seed=0)])
    assert all(type(t) is int for t in out.token_ids) and all(type(v) is float for v in out.logprobs)
    with pytest.raises(ValueError):
        Sampler()(torch.randn(3, 10), [row(temperature=0)])
    assert Sampler()(torch.randn(0, 10), []).token_ids == []


def test_filters_same_whether_batched_or_alone():
    logits = torch.randn(5, 300, generator=torch.Generator().manual_seed(8)) * 2
    params = [SamplingParams(top_k=3), SamplingParams(top_p=0.8), SamplingParams(top_k=40, top_p=0.7),
              SamplingParams(temperature=0.5, min_p=0.1), SamplingParams(top_k=299, top_p=0.99, min_p=0.02)]
    batched = apply_filters(logits, params)
    for i, p in enumerate(params):
        assert torch.equal(batched[i], apply_filters(logits[i:i + 1], [p])[0])
    assert torch.isfinite(batched[0]).sum() == 3


def test_native_row_argmax_and_logsumexp_equal_pytorch():
    """The sampler's one-pass CPU statistics: the first index of a tied maximum, masked (-inf)
    entries, a vocabulary that is not a multiple of the vector width, wide value ranges."""
    from lmserve.quant import native

    ext = native.load()
    if ext is None:
        pytest.skip("the native extension did not build here")
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 1003, generator=generator) * torch.tensor([[0.1], [1.0], [10.0], [30.0], [3.0], [1.0]])
    logits[1, 17] = logits[1, 900] = logits[1].max() + 1  # tie: the first index wins
    logits[2, ::3] = float("-inf")
    logits[4, 1001] = 50.0  # the maximum in the scalar tail
    logits[5, :-1] = float("-inf")  # a single finite entry
    ids, log_norm = ext.argmax_logsumexp(logits)
    assert ids.tolist() == logits.argmax(dim=-1).tolist()
    assert ids[1] == 17 and ids[4] == 1001 and ids[5] == 1002
    torch.testing.assert_close(log_norm, torch.logsumexp(logits, dim=-1), rtol=1e-6, atol=1e-5)
