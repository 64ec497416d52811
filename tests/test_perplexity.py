"""The quality report against transformers: all-position logits of `LLMEngine.score`, perplexity
in llama.cpp's windows (second half of each window scored, BOS-led windows), KL divergence and
top-1 agreement against a reference, and the `lmserve perplexity` command end to end."""

import json
import math

import pytest
import torch

from lmserve import LLM
from lmserve.entrypoints.cli import main
from lmserve.errors import InvalidParameterError
from lmserve.quality import perplexity_windows, quality_report
from tests.tiny_tokenizer import SAMPLE_TEXT, with_tokenizer

CTX = 64
TOKENS = torch.randint(0, 320, (3 * CTX + 17,), generator=torch.Generator().manual_seed(3)).tolist()


def _engine(directory, **options):
    return LLM(str(directory), dtype="float32", quantization="none", **options).engine


def _hf_window_logprobs(hf_model, window):
    """Log-probabilities of transformers at the positions llama.cpp scores: ctx/2 .. ctx-2."""
    with torch.no_grad():
        logits = hf_model(torch.tensor([window])).logits[0].double()
    return torch.log_softmax(logits[len(window) // 2: -1], dim=-1)


def _direct_perplexity(hf_model, tokens, ctx, bos=None):
    nll, count = 0.0, 0
    for start in range(0, len(tokens) - ctx + 1, ctx):
        window = tokens[start: start + ctx]
        if bos is not None:
            window = [bos] + window[1:]
        logprobs = _hf_window_logprobs(hf_model, window)
        targets = window[ctx // 2 + 1:]
        nll -= sum(logprobs[i, t].item() for i, t in enumerate(targets))
        count += len(targets)
    return math.exp(nll / count), count


def test_score_gives_every_position_logits_in_chunks(tiny_model_factory):
    directory, hf_model = tiny_model_factory("llama_gqa")
    engine = _engine(directory, max_num_batched_tokens=40)
    free_before = engine.block_manager.num_free_blocks
    logits = engine.score(TOKENS[:150])  # four prefill chunks
    with torch.no_grad():
        reference = hf_model(torch.tensor([TOKENS[:150]])).logits[0]
    assert logits.dtype == torch.float32 and logits.shape == reference.shape
    assert (logits - reference).abs().max().item() <= 1e-4
    assert engine.block_manager.num_free_blocks == free_before


@pytest.mark.parametrize("bos", [None, 7])
def test_perplexity_equals_transformers(tiny_model_factory, bos):
    directory, hf_model = tiny_model_factory("llama_gqa")
    engine = _engine(directory)
    windows = perplexity_windows(TOKENS, CTX, bos)
    assert len(windows) == 3 and all(w[0] == (bos if bos is not None else TOKENS[i * CTX])
                                     for i, w in enumerate(windows))
    report = quality_report(engine.score, windows)
    expected, count = _direct_perplexity(hf_model, TOKENS, CTX, bos)
    assert report.num_scored == count == 3 * (CTX - CTX // 2 - 1)
    assert report.perplexity == pytest.approx(expected, rel=1e-4)


def test_kl_against_itself_is_zero(tiny_model_factory):
    directory, _ = tiny_model_factory("llama_gqa")
    engine = _engine(directory)
    report = quality_report(engine.score, perplexity_windows(TOKENS, CTX), reference=engine.score)
    assert report.mean_kl == pytest.approx(0.0, abs=1e-7)
    assert report.top1_agreement == 1.0
    assert report.reference_perplexity == pytest.approx(report.perplexity, rel=1e-9)


def test_kl_against_another_model_matches_transformers(tiny_model_factory):
    model_dir, hf_model = tiny_model_factory("llama_gqa")
    ref_dir, hf_reference = tiny_model_factory("qwen2")
    windows = perplexity_windows(TOKENS, CTX, max_windows=2)
    report = quality_report(_engine(model_dir).score, windows, reference=_engine(ref_dir).score)
    kl, agree, count = 0.0, 0, 0
    for window in windows:
        p_log = _hf_window_logprobs(hf_reference, window)
        q_log = _hf_window_logprobs(hf_model, window)
        kl += (p_log.exp() * (p_log - q_log)).sum().item()
        agree += int((p_log.argmax(-1) == q_log.argmax(-1)).sum())
        count += len(p_log)
    assert report.mean_kl > 0
    assert report.mean_kl == pytest.approx(kl / count, rel=1e-4)
    assert report.top1_agreement == agree / count
    assert report.reference_perplexity == pytest.approx(_direct_perplexity(hf_reference, TOKENS[:2 * CTX], CTX)[0],
                                                        rel=1e-4)


def test_too_short_text_is_refused():
    with pytest.raises(InvalidParameterError, match="fewer than one window"):
        perplexity_windows(TOKENS[:CTX - 1], CTX)


def test_cli_perplexity_on_text(tiny_model_factory, tmp_path):
    from tokenizers import Tokenizer

    base, hf_model = tiny_model_factory("llama_gqa")
    ref_base, _ = tiny_model_factory("qwen2")
    model_dir = with_tokenizer(base, tmp_path / "llama", 320)
    ref_dir = with_tokenizer(ref_base, tmp_path / "qwen2", 320)
    text_file = tmp_path / "text.txt"
    text_file.write_text(SAMPLE_TEXT, encoding="utf-8")
    out = tmp_path / "ppl.json"
    status = main(["perplexity", str(model_dir), "--text", str(text_file), "--ctx", "128", "--dtype", "float32",
                   "--quantization", "none", "--reference", str(ref_dir), "--json", str(out)])
    assert status == 0
    figures = json.loads(out.read_text())
    tokens = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(SAMPLE_TEXT).ids
    expected, count = _direct_perplexity(hf_model, tokens, 128)
    assert figures["num_windows"] == len(tokens) // 128 and figures["num_scored"] == count
    assert figures["perplexity"] == pytest.approx(expected, rel=1e-4)
    assert figures["mean_kl"] > 0 and 0 <= figures["top1_agreement"] <= 1


def test_cli_perplexity_bad_ctx_names_it(tiny_model_factory, tmp_path, capsys):
    base, _ = tiny_model_factory("llama_gqa")
    model_dir = with_tokenizer(base, tmp_path / "llama", 320)
    text_file = tmp_path / "text.txt"
    text_file.write_text(SAMPLE_TEXT, encoding="utf-8")
    assert main(["perplexity", str(model_dir), "--text", str(text_file), "--ctx", "4096"]) == 2
    assert "ctx" in capsys.readouterr().err
