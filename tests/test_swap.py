"""Swap preemption on a tiny random model: requests preempted to the swap tier (a memory-mapped
file, since the cache is on the CPU) finish with exactly the greedy tokens of an unconstrained
run, as do requests preempted by recompute when the swap space is too small; greedy outputs do
not depend on the preemption mode or on what else is in the batch."""

import pytest

from lmserve import LLM, SamplingParams
from lmserve.errors import InvalidParameterError

PROMPTS = [[(7 * i + j) % 300 + 1 for j in range(10 + 3 * i)] for i in range(6)]
PARAMS = SamplingParams(max_tokens=30, temperature=0, ignore_eos=True)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def model_dir(tiny_model_factory):
    return str(tiny_model_factory("llama_gqa")[0])


@pytest.fixture(scope="module")
def reference(model_dir):
    llm = LLM(model_dir, dtype="float32", quantization="none", block_size=4)
    together = _tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False))
    alone = [_tokens(llm.generate([p], PARAMS, use_tqdm=False))[0] for p in PROMPTS]
    assert together == alone
    return together


def _pressed(model_dir, **options):
    # 24 blocks of 4 tokens hold about a third of the six requests' 300 positions.
    return LLM(model_dir, dtype="float32", quantization="none", block_size=4, num_kv_blocks=24, **options)


def _assert_released(llm):
    bm = llm.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks and len(bm.free_swap_blocks) == bm.num_swap_blocks


def test_swapped_requests_finish_with_the_greedy_tokens(model_dir, reference):
    llm = _pressed(model_dir, preemption_mode="swap", swap_space="1MiB")
    swaps = []
    swap_out = llm.engine.runner.swap_out
    llm.engine.runner.swap_out = lambda pairs: (swaps.append(len(pairs)), swap_out(pairs))
    assert _tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == reference
    scheduler = llm.engine.scheduler
    assert scheduler.num_swap_outs > 0 and scheduler.num_swap_outs == scheduler.num_preemptions
    assert sum(swaps) > 0
    _assert_released(llm)


def test_full_swap_space_falls_back_to_recompute(model_dir, reference):
    block_bytes = 2 * 2 * 2 * 16 * 4 * 4  # K and V, 2 layers, 2 kv heads, head_dim 16, fp32, 4 tokens
    llm = _pressed(model_dir, preemption_mode="swap", swap_space=3 * block_bytes)
    assert llm.engine.block_manager.num_swap_blocks == 3
    assert _tokens(llm.generate(PROMPTS, PARAMS, use_tqdm=False)) == reference
    scheduler = llm.engine.scheduler
    assert scheduler.num_preemptions > scheduler.num_swap_outs
    _assert_released(llm)


def test_recompute_and_swap_agree_and_batch_composition_does_not_matter(model_dir, reference):
    for mode in ("recompute", "swap"):
        llm = _pressed(model_dir, preemption_mode=mode, max_num_batched_tokens=16)
        assert _tokens(llm.generate(PROMPTS[::-1], PARAMS, use_tqdm=False)) == reference[::-1]
        assert llm.engine.scheduler.num_preemptions > 0
        _assert_released(llm)


def test_aborting_a_swapped_request_frees_its_swap_blocks(model_dir):
    llm = _pressed(model_dir, preemption_mode="swap")
    engine = llm.engine
    ids = [engine.add_request(p, PARAMS) for p in PROMPTS]
    while not engine.scheduler.num_swap_outs:
        engine.step()
    swapped = [s for s in engine.scheduler.waiting if s.swap_table]
    assert swapped
    for request_id in ids:
        engine.abort_request(request_id)
    _assert_released(llm)


def test_bad_preemption_options_are_refused(model_dir):
    with pytest.raises(InvalidParameterError, match="preemption_mode"):
        LLM(model_dir, preemption_mode="discard")
    with pytest.raises(InvalidParameterError, match="swap_space"):
        LLM(model_dir, preemption_mode="swap", swap_space="lots")
