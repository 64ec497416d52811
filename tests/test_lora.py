"""LoRA adapters against transformers + peft on the same random weights: logits and greedy tokens
of several adapters and the base model in one batch, a packed GGUF base, the adapter cache and
the errors a bad adapter gets."""

import copy
import json
import shutil

import pytest
import torch

from lmserve import LLM, LoRARequest, SamplingParams
from lmserve.errors import InvalidParameterError
from tests.test_model_numerics import PROMPT, LogitRecorder, hf_logits

peft = pytest.importorskip("peft")

ALL_PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ADAPTERS = {
    "qv": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "all": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=ALL_PROJECTIONS),
    "q_down": dict(r=16, lora_alpha=32, target_modules=["q_proj", "down_proj"], alpha_pattern={"down_proj": 4}),
}
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def make_adapter(hf_model, directory, seed, **config):
    """A random PEFT adapter on a copy of `hf_model` (lora_B non-zero, so it changes the
    output), saved under `directory`; returns the peft model as the reference."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(init_lora_weights=False, **config))
    with torch.no_grad():  # peft's random init is kaiming-uniform; scaled so logits move but stay tame
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.mul_(0.5)
    model.save_pretrained(directory)
    return model.eval()


@pytest.fixture(scope="module", params=["llama_mqa_tied", "qwen3"])
def family(request, tiny_model_factory, tmp_path_factory):
    """(model directory, transformers model, {adapter name: (LoRARequest, peft model)})."""
    path, hf_model = tiny_model_factory(request.param)
    adapters = {}
    for i, (name, config) in enumerate(ADAPTERS.items()):
        directory = tmp_path_factory.mktemp(f"{request.param}-{name}")
        adapters[name] = (LoRARequest(name, i + 1, str(directory)), make_adapter(hf_model, directory, 100 + i, **config))
    return path, hf_model, adapters


def test_mixed_batch_of_three_adapters_and_the_base_matches_peft(family):
    path, hf_model, adapters = family
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=3)
    # the base model computes a prompt first: its cached blocks must not serve an adapter's request
    llm.generate([PROMPT], GREEDY, use_tqdm=False)
    recorder = LogitRecorder(llm.engine.sampler)
    llm.engine.sampler = recorder
    # "qv" twice, apart: the runner groups its rows, the logits come back in request order
    prompts = [PROMPT, PROMPT[:9], PROMPT[:14], PROMPT[3:8], PROMPT[6:17]]
    names = ["qv", None, "all", "q_down", "qv"]
    outs = llm.generate(prompts, GREEDY, use_tqdm=False,
                        lora_request=[adapters[n][0] if n else None for n in names])
    steps = torch.stack(recorder.rows)  # [step, request, vocab]: all five run every step, in order
    assert steps.shape[:2] == (16, 5)
    base_tokens = None
    for i, (prompt, name, out) in enumerate(zip(prompts, names, outs)):
        reference_model = adapters[name][1] if name else hf_model
        generated = out.outputs[0].token_ids
        reference = hf_logits(reference_model, prompt + generated)[len(prompt) - 1: -1]
        diff = (steps[:, i] - reference).abs().max().item()
        assert diff <= 1e-4, f"{name or 'base'}: max abs logit diff {diff}"
        assert generated == reference.argmax(-1).tolist(), name or "base"
        if name is None:
            continue
        base = hf_logits(hf_model, prompt + generated)[len(prompt) - 1: -1]
        assert (base - reference).abs().max().item() > 0.05, f"adapter {name} barely changes the logits"
    base_tokens = llm.generate([PROMPT], GREEDY, use_tqdm=False)[0].outputs[0].token_ids
    assert base_tokens != outs[0].outputs[0].token_ids  # adapter "qv" on the same prompt differs


def test_score_and_stream_run_with_the_adapter(family):
    path, _, adapters = family
    request, reference_model = adapters["all"]
    llm = LLM(str(path), dtype="float32", enable_lora=True)
    diff = (llm.engine.score(PROMPT, lora_request=request) - hf_logits(reference_model, PROMPT)).abs().max().item()
    assert diff <= 1e-4
    streamed = [o.outputs[0].token_ids for o in llm.stream(PROMPT, GREEDY, lora_request=request)][-1]
    assert streamed == llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=request)[0].outputs[0].token_ids


def test_more_adapters_than_max_loras_wait_their_turn(family):
    path, hf_model, adapters = family
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_loras=1, max_cpu_loras=2)
    running = []
    original = llm.engine.runner.execute

    def execute(output):  # the adapters of each step
        running.append({r.seq.request.lora for r in output.scheduled} - {None})
        return original(output)

    llm.engine.runner.execute = execute
    names = ["qv", "all", "q_down", "qv"]
    outs = llm.generate([PROMPT[:10]] * 4, GREEDY, use_tqdm=False, lora_request=[adapters[n][0] for n in names])
    assert max(len(step) for step in running) == 1
    for name, out in zip(names, outs):
        generated = out.outputs[0].token_ids
        reference = hf_logits(adapters[name][1], PROMPT[:10] + generated)[9:-1]
        assert generated == reference.argmax(-1).tolist(), name
    assert len(llm.engine.list_loras()) == 2  # the least recently used third adapter was evicted


def test_removed_adapter_finishes_running_requests_and_is_reloaded_by_name(family):
    path, _, adapters = family
    request, _ = adapters["qv"]
    llm = LLM(str(path), dtype="float32", enable_lora=True)
    expected = llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=request)[0].outputs[0].token_ids
    stream = llm.stream(PROMPT, GREEDY, lora_request=request)
    next(stream)
    assert llm.engine.remove_lora("qv") and not llm.engine.remove_lora("qv")
    assert llm.engine.list_loras() == []
    assert [o for o in stream][-1].outputs[0].token_ids == expected
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=request)[0].outputs[0].token_ids == expected


def test_packed_gguf_base_matches_peft_on_the_dequantized_weights(tmp_path):
    from lmserve.quant.gguf_writer import quantize_model
    from tests.test_quantize import _load_into_transformers, _wide_llama
    from tests.tiny_tokenizer import save_tokenizer

    directory = tmp_path / "hf"
    hf_model = _wide_llama(directory)
    save_tokenizer(directory, 320)
    out = tmp_path / "q8.gguf"
    quantize_model(directory, out, "q8_0")
    reference_base = _load_into_transformers(copy.deepcopy(hf_model), out)
    # the adapter is made for the original HF weights; its factors do not depend on them
    adapter_dir = tmp_path / "adapter"
    make_adapter(hf_model, adapter_dir, 7, **ADAPTERS["all"])
    reference = make_adapter(reference_base, tmp_path / "same-adapter", 7, **ADAPTERS["all"])
    llm = LLM(str(out), dtype="float32", enable_lora=True)
    assert llm.engine.model.model.layers[0].self_attn.qkv_proj.packed is not None  # the base stays packed
    request = LoRARequest("all", 1, str(adapter_dir))
    prompts = [PROMPT, PROMPT[5:17]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True), use_tqdm=False,
                        lora_request=[request, request])
    for prompt, out in zip(prompts, outs):
        generated = out.outputs[0].token_ids
        assert generated == hf_logits(reference, prompt + generated)[len(prompt) - 1: -1].argmax(-1).tolist()
    assert llm.engine.runner.fused_decode.runs_lora(llm.engine.lora.loaded["all"])  # natively, in C++


@pytest.mark.parametrize("lora_dtype", ["auto", "float32"])
def test_adapters_in_the_fused_decoder_match_the_module_path(family, lora_dtype):
    """A packed (int8) base with three adapters and base rows in one batch: every step runs in the
    fused native decoder (no step falls back to the modules), and its logits stay within the
    block kernel's tolerance of the module path's on the same weights, greedy tokens equal — with
    the factors stored as bf16 (auto, on a packed base) and as fp32."""
    path, _, adapters = family
    prompts = [PROMPT, PROMPT[:9], PROMPT[:14], PROMPT[3:8], PROMPT[6:17]]
    names = ["qv", None, "all", "q_down", "qv"]
    requests = [adapters[n][0] if n else None for n in names]
    runs = []
    for enforce_eager in (False, True):
        llm = LLM(str(path), quantization="int8", enable_lora=True, max_loras=3, enforce_eager=enforce_eager,
                  lora_dtype=lora_dtype)
        assert llm.engine.lora.dtype == (torch.bfloat16 if lora_dtype == "auto" else torch.float32)
        runner = llm.engine.runner
        module_steps = []
        prepare_modules = runner._prepare_modules
        runner._prepare_modules = lambda *args: (module_steps.append(1), prepare_modules(*args))[1]
        recorder = LogitRecorder(llm.engine.sampler)
        llm.engine.sampler = recorder
        outs = llm.generate(prompts, GREEDY, use_tqdm=False, lora_request=requests)
        assert bool(module_steps) == enforce_eager
        runs.append(([o.outputs[0].token_ids for o in outs], torch.stack(recorder.rows)))
    (fused_tokens, fused_logits), (module_tokens, module_logits) = runs
    assert fused_tokens == module_tokens
    relative = ((fused_logits - module_logits).abs().max() / module_logits.abs().max()).item()
    assert relative < 5e-4, relative


def test_lora_dtype_auto_follows_the_base_and_bad_values_are_refused(family):
    path, _, adapters = family
    request = adapters["qv"][0]
    dense = LLM(str(path), dtype="float32", enable_lora=True)
    dense.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=request)
    assert all(a.dtype == b.dtype == torch.float32 for a, b in dense.engine.lora.loaded["qv"].weights.values())
    packed = LLM(str(path), quantization="int4", enable_lora=True)
    packed.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=request)
    assert all(a.dtype == b.dtype == torch.bfloat16 for a, b in packed.engine.lora.loaded["qv"].weights.values())
    for bad in ("float16", "int8", "fp64"):
        with pytest.raises(InvalidParameterError, match=f"lora_dtype.*{bad}"):
            LLM(str(path), enable_lora=True, lora_dtype=bad)


def _copy_adapter(source, target, edit_config=None, drop=None):
    shutil.copytree(source, target)
    if edit_config:
        config = json.loads((target / "adapter_config.json").read_text())
        config.update(edit_config)
        (target / "adapter_config.json").write_text(json.dumps(config))
    if drop:
        (target / drop).unlink()
    return str(target)


def test_bad_adapters_are_refused_naming_the_problem(family, tmp_path, tiny_model_factory):
    from pathlib import Path

    path, hf_model, adapters = family
    good = Path(adapters["qv"][0].lora_path)
    llm = LLM(str(path), dtype="float32", enable_lora=True, max_lora_rank=8)

    def refused(directory, match):
        with pytest.raises(InvalidParameterError, match=match):
            llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=LoRARequest("bad", 9, str(directory)))

    refused(tmp_path / "nowhere", "no such directory")
    refused(_copy_adapter(good, tmp_path / "a", drop="adapter_model.safetensors"), "missing adapter_model.safetensors")
    refused(_copy_adapter(good, tmp_path / "b", drop="adapter_config.json"), "missing adapter_config.json")
    refused(_copy_adapter(good, tmp_path / "c", {"modules_to_save": ["lm_head"]}), "modules_to_save")
    refused(_copy_adapter(good, tmp_path / "d", {"use_dora": True}), "DoRA")
    refused(adapters["q_down"][0].lora_path, "rank 16, over max_lora_rank \\(8\\)")
    embed = tmp_path / "embed"
    make_adapter(hf_model, embed, 3, r=4, target_modules=["embed_tokens"])
    refused(embed, "targets the embedding 'model.embed_tokens'")
    lm_head = tmp_path / "lm_head"
    make_adapter(hf_model, lm_head, 3, r=4, target_modules=["lm_head"])
    refused(lm_head, "'lm_head' is not a linear projection")
    other_path, other_model = tiny_model_factory("llama_gqa" if "qwen3" in str(path) else "qwen3")
    mismatched = tmp_path / "mismatch"
    make_adapter(other_model, mismatched, 4, r=4, target_modules=["q_proj"])
    refused(mismatched, "do not fit the base model")
    assert llm.generate(PROMPT, GREEDY, use_tqdm=False)[0].outputs[0].token_ids  # the engine still serves
    with pytest.raises(InvalidParameterError, match="without enable_lora"):
        LLM(str(path), dtype="float32").generate(PROMPT, GREEDY, lora_request=adapters["qv"][0])
    with pytest.raises(InvalidParameterError, match="lora_int_id"):
        LoRARequest("x", 0, str(good))
    llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=[adapters["qv"][0]])
    with pytest.raises(InvalidParameterError, match="already the id"):
        llm.generate(PROMPT, GREEDY, use_tqdm=False, lora_request=LoRARequest("other", 1, str(good)))
