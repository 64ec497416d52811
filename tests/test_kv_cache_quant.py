"""16-bit (bfloat16, float16) and quantized (int8, fp8 with one scale per token and head) KV
caches: capacity gained, logit error bounded against the full-precision cache, and greedy outputs
that agree with it."""

import pytest
import torch

from lmserve import LLM, SamplingParams
from tests.test_engine import PROMPTS
from tests.test_model_numerics import PROMPT, LogitRecorder

# Measured on the tiny Llama (logits span about ±2.6): max |logit diff| over these prompts is
# 1.2e-2 for int8, 6.3e-2 for fp8 e4m3, 3.8e-3 for bfloat16 and 6.4e-4 for float16.
LOGIT_BOUND = {"int8": 2e-2, "fp8": 1.5e-1, "bfloat16": 8e-3, "float16": 1.5e-3}


@pytest.mark.parametrize("kv_dtype", ["int8", "fp8", "bfloat16", "float16"])
def test_logit_error_is_bounded(kv_dtype, tiny_model_factory):
    """Each prompt's last-position logits read every earlier position back from the quantized cache."""
    directory, _ = tiny_model_factory("llama_gqa")
    prompts = [PROMPT[:n] for n in (5, 11, 17, 20)]
    rows = {}
    for dtype in ("auto", kv_dtype):
        llm = LLM(str(directory), dtype="float32", kv_cache_dtype=dtype)
        recorder = LogitRecorder(llm.engine.sampler)
        llm.engine.sampler = recorder
        for prompt in prompts:
            llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
        rows[dtype] = torch.cat(recorder.rows)
    diff = (rows[kv_dtype] - rows["auto"]).abs().max().item()
    assert 0 < diff <= LOGIT_BOUND[kv_dtype], diff


def test_int8_cache_holds_more_tokens_and_mostly_agrees(smollm2_path):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = LLM(str(smollm2_path), deterministic=True, kv_cache_memory="64MiB")
    packed = LLM(str(smollm2_path), deterministic=True, kv_cache_memory="64MiB", kv_cache_dtype="int8")
    assert packed.engine.block_manager.num_blocks >= 3.5 * full.engine.block_manager.num_blocks
    expected = [o.outputs[0].token_ids for o in full.generate(PROMPTS, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in packed.generate(PROMPTS, params, use_tqdm=False)]
    agree = sum(a == b for a, b in zip(expected, got))
    # Measured: 7 of 8 prompts identical over 24 greedy tokens (fp8: 4 of 8, so it is not asserted).
    assert agree >= len(PROMPTS) - 2, f"{agree}/{len(PROMPTS)} prompts agree"


def test_unknown_kv_cache_dtype_is_refused():
    from lmserve.config import EngineConfig
    from lmserve.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError, match="kv_cache_dtype: must be one of auto, bfloat16, .*int8, fp8"):
        EngineConfig(kv_cache_dtype="int4")


def test_bfloat16_cache_holds_twice_the_tokens_and_agrees(smollm2_path):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    full = LLM(str(smollm2_path), kv_cache_memory="64MiB")
    half = LLM(str(smollm2_path), kv_cache_memory="64MiB", kv_cache_dtype="bfloat16")
    assert half.engine.block_manager.num_blocks == 2 * full.engine.block_manager.num_blocks
    expected = [o.outputs[0].token_ids for o in full.generate(PROMPTS, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in half.generate(PROMPTS, params, use_tqdm=False)]
    agree = sum(a == b for a, b in zip(expected, got))
    assert agree >= len(PROMPTS) - 1, f"{agree}/{len(PROMPTS)} prompts agree"
