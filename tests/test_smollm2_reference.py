"""The embedded SmolLM2-135M-Instruct GGUF against transformers loading the same GGUF file
(both dequantize to fp32): prefill logits and greedy chat replies."""

import pytest
import torch

from lmserve import LLM, SamplingParams

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a short poem about autumn leaves.",
    "Explain photosynthesis to a child in two sentences.",
    "List three prime numbers.",
    "How do I reverse a list in Python?",
]


@pytest.fixture(scope="module")
def reference(smollm2_path):
    transformers = pytest.importorskip("transformers")
    directory, name = str(smollm2_path.parent), smollm2_path.name
    model = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                              dtype=torch.float32).eval()
    return model


@pytest.fixture(scope="module")
def llm(smollm2_path):
    return LLM(str(smollm2_path), dtype="float32", quantization="none")


def test_prefill_logits_match_transformers_gguf(llm, reference):
    messages = [{"role": "user", "content": CHAT_PROMPTS[2]}]
    ids = llm.tokenizer.encode(llm.apply_chat_template(messages))
    captured = []
    sampler = llm.engine.sampler
    llm.engine.sampler = lambda logits, rows, stops=None: (captured.append(logits.clone()), sampler(logits, rows, stops))[1]
    try:
        llm.generate([ids], SamplingParams(max_tokens=1, temperature=0), use_tqdm=False)
    finally:
        llm.engine.sampler = sampler
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0, -1].float()
    diff = (captured[0][0] - expected).abs().max().item()
    assert diff <= 1e-3, f"max abs logit diff {diff}"


def test_greedy_chat_replies_match_transformers(llm, reference):
    params = SamplingParams(max_tokens=40, temperature=0)
    conversations = [[{"role": "user", "content": p}] for p in CHAT_PROMPTS]
    ours = llm.chat(conversations, params, use_tqdm=False)
    for conversation, out in zip(conversations, ours):
        ids = llm.tokenizer.encode(llm.apply_chat_template(conversation))
        with torch.no_grad():
            generated = reference.generate(torch.tensor([ids]), max_new_tokens=40, do_sample=False,
                                           eos_token_id=sorted(llm.tokenizer.stop_token_ids),
                                           pad_token_id=llm.tokenizer.eos_token_id)
        theirs = generated[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == theirs
