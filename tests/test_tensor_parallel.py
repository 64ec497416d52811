"""Tensor parallelism on the CPU (gloo, two processes): logits and greedy tokens of a model split
over two ranks against the same model whole, on tiny models of each family kind and on the
embedded SmolLM2 GGUF (packed, 9 heads shared 6 + 3); refusals; a rank that dies ends the engine
with a message naming it, and the server answers 503 and exits on SIGTERM."""

import os
import shutil
import signal
import subprocess
import sys
import time

import httpx
import pytest
import torch

from lmserve import LLM, SamplingParams
from lmserve.errors import EngineDeadError, InvalidParameterError
from tests.test_model_numerics import PROMPT, LogitRecorder

GREEDY = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
PROMPTS = [PROMPT, PROMPT[:7], PROMPT[4:19]]


def logits_and_tokens(path, tp, check_fused=False, **engine_kwargs):
    """Greedy tokens and the logits of every step for PROMPTS, the long prompt chunked so that
    prefill chunks and decode tokens share steps (`check_fused`: rank 0 runs the fused decoder)."""
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=tp, max_num_batched_tokens=8, **engine_kwargs)
    try:
        assert not check_fused or llm.engine.runner.fused_decode is not None
        recorder = LogitRecorder(llm.engine.sampler)
        llm.engine.sampler = recorder
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        return [o.outputs[0].token_ids for o in outs], torch.cat(recorder.rows)
    finally:
        llm.engine.close()


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen3", "mixtral", "gpt2", "llama_mqa_tied"])
def test_two_ranks_match_one(kind, tiny_model_factory):
    path, _ = tiny_model_factory(kind)
    whole_tokens, whole = logits_and_tokens(path, 1)
    split_tokens, split = logits_and_tokens(path, 2)
    assert split_tokens == whole_tokens
    relative = ((split - whole).abs().max() / whole.abs().max()).item()
    assert relative <= 1e-5, f"{kind}: logits differ by {relative:.2e} of their largest magnitude"


@pytest.mark.parametrize("kind", ["llama_gqa", "qwen3", "gpt2"])
def test_fused_decoder_per_rank_matches_one_rank(kind, tiny_model_factory):
    """Packed (int8) weights, so every rank runs its shard in the fused native decoder with the
    all-reduces called between its layers: greedy tokens equal the whole model's and logits stay
    within the block kernel's tolerance (a split moves where activations are rounded to int16)."""
    path, _ = tiny_model_factory(kind)
    whole_tokens, whole = logits_and_tokens(path, 1, quantization="int8")
    split_tokens, split = logits_and_tokens(path, 2, quantization="int8", check_fused=True)
    assert split_tokens == whole_tokens
    relative = ((split - whole).abs().max() / whole.abs().max()).item()
    assert relative <= 5e-4, f"{kind}: logits differ by {relative:.2e} of their largest magnitude"


def test_smollm2_gguf_split_six_and_three_heads_gives_the_same_chat_replies():
    """Through the modules and through each rank's fused decoder."""
    questions = [[{"role": "user", "content": "What is the capital of France?"}],
                 [{"role": "user", "content": "Name three rivers."}]]
    params = SamplingParams(max_tokens=24, temperature=0)
    replies = {}
    for tp, eager in ((1, True), (2, True), (2, False)):
        llm = LLM(tensor_parallel_size=tp, kv_cache_memory="64MiB", enforce_eager=eager)
        try:
            assert (llm.engine.runner.fused_decode is None) == eager
            replies[tp, eager] = [o.outputs[0].text for o in llm.chat(questions, params, use_tqdm=False)]
        finally:
            llm.engine.close()
    assert replies[2, True] == replies[1, True]
    assert replies[2, False] == replies[1, True]  # each rank's shard in the fused decoder


def test_splits_that_cannot_work_are_refused(tiny_model_factory):
    path, _ = tiny_model_factory("llama_gqa")  # 4 heads, 2 KV heads
    with pytest.raises(InvalidParameterError, match="3 ranks cannot share 4 attention heads with 2 KV heads"):
        LLM(str(path), tensor_parallel_size=3)
    with pytest.raises(InvalidParameterError, match="8 ranks exceed the model's 4 attention heads"):
        LLM(str(path), tensor_parallel_size=8)
    with pytest.raises(InvalidParameterError, match="LoRA"):
        LLM(str(path), tensor_parallel_size=2, enable_lora=True)
    gemma, _ = tiny_model_factory("gemma3")
    with pytest.raises(InvalidParameterError, match="gemma3 family does not split"):
        LLM(str(gemma), tensor_parallel_size=2)


def test_a_killed_rank_ends_the_engine_naming_it(tiny_model_factory):
    path, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2)
    try:
        llm.generate([PROMPT], GREEDY, use_tqdm=False)
        worker = llm.engine.workers.processes[0]
        start = time.monotonic()
        llm.engine.add_request(PROMPT, SamplingParams(max_tokens=200, ignore_eos=True))
        llm.engine.step()
        os.kill(worker.pid, signal.SIGKILL)
        with pytest.raises(EngineDeadError, match=f"rank 1 \\(pid {worker.pid}\\)"):
            while llm.engine.has_unfinished_requests():
                llm.engine.step()
        assert time.monotonic() - start < 30
        with pytest.raises(EngineDeadError, match="rank 1"):  # and every later step
            llm.engine.step()
    finally:
        llm.engine.close()


def test_a_stopped_rank_ends_the_engine_naming_it(tiny_model_factory, monkeypatch):
    """A worker that hangs (SIGSTOP) rather than dies: rank 0 gives up after the collective
    timeout (shortened here) and names the rank that did not arrive."""
    from lmserve.engine import tensor_parallel

    monkeypatch.setattr(tensor_parallel, "TIMEOUT_SECONDS", 3)
    path, _ = tiny_model_factory("llama_gqa")
    llm = LLM(str(path), dtype="float32", tensor_parallel_size=2)
    worker = llm.engine.workers.processes[0]
    try:
        llm.generate([PROMPT], GREEDY, use_tqdm=False)
        os.kill(worker.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(EngineDeadError, match=f"rank 1 \\(pid {worker.pid}\\) stopped answering"):
            llm.generate([PROMPT], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 15
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
        llm.engine.close()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


def test_server_answers_503_after_a_rank_dies_and_exits_on_sigterm(tiny_model_factory, tmp_path):
    from tests.tiny_tokenizer import save_tokenizer

    path, _ = tiny_model_factory("llama_gqa")
    model = tmp_path / "model"
    shutil.copytree(path, model)
    save_tokenizer(model, 320)
    port = 18000 + os.getpid() % 1000
    server = subprocess.Popen([sys.executable, "-m", "lmserve.entrypoints.cli", "serve", "--model", str(model),
                               "--tensor-parallel-size", "2", "--port", str(port), "--dtype", "float32"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        body = {"prompt": [5, 17, 250], "max_tokens": 4}
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200
        ranks = [pid for pid in _children(server.pid) if b"spawn_main" in open(f"/proc/{pid}/cmdline", "rb").read()]
        assert len(ranks) == 1
        os.kill(ranks[0], signal.SIGKILL)
        failed = httpx.post(f"{base}/v1/completions", json={**body, "max_tokens": 64}, timeout=60)
        assert failed.status_code >= 500
        health = httpx.get(f"{base}/health", timeout=10)
        assert health.status_code == 503 and "rank 1" in health.json()["error"]["message"]
        assert httpx.post(f"{base}/v1/completions", json=body, timeout=10).status_code == 503
        server.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal it caught: the status says SIGTERM
        assert server.wait(30) in (0, -signal.SIGTERM)
        assert "Traceback" not in server.stderr.read()
    finally:
        if server.poll() is None:
            server.kill()
            server.wait()


def test_torchrun_launch_gives_the_same_reply(tmp_path, tiny_model_factory):
    """`torchrun --nproc-per-node 2 -m lmserve.entrypoints.cli generate ... --tensor-parallel-size 2`:
    rank 0 generates with the process torchrun started as rank 1, which then exits too."""
    from tests.tiny_tokenizer import save_tokenizer

    path, _ = tiny_model_factory("llama_gqa")
    model = tmp_path / "model"
    shutil.copytree(path, model)
    save_tokenizer(model, 320)
    command = ["-m", "lmserve.entrypoints.cli", "generate", "the river", "--model", str(model), "--max-tokens", "8",
               "--dtype", "float32"]
    whole = subprocess.run([sys.executable, *command], capture_output=True, timeout=120)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    split = subprocess.run([*torchrun, *command, "--tensor-parallel-size", "2"], capture_output=True, timeout=180)
    assert split.returncode == 0, split.stderr.decode()[-2000:]
    assert split.stdout == whole.stdout and whole.stdout.strip()
    assert b"leaked" not in split.stderr


def test_beam_search_prefix_hits_and_preemption_match_one_rank(tiny_model_factory):
    """Through the same runner on every rank: beams (forks, copy-on-write block copies), a
    prompt served from the prefix cache, and preemption when a small cache runs out."""
    from lmserve import BeamSearchParams

    path, _ = tiny_model_factory("qwen3")
    prompts = [PROMPT, PROMPT[:12], PROMPT[3:18], PROMPT]  # the last one hits the first's cached blocks
    results = {}
    for tp in (1, 2):
        llm = LLM(str(path), dtype="float32", tensor_parallel_size=tp, num_kv_blocks=12, block_size=4)
        try:
            beams = llm.beam_search([PROMPT[:9]], BeamSearchParams(beam_width=3, max_tokens=6), use_tqdm=False)
            greedy = llm.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True),
                                  use_tqdm=False)
            results[tp] = ([s.token_ids for s in beams[0].sequences], [o.outputs[0].token_ids for o in greedy],
                           llm.engine.scheduler.num_preemptions, llm.engine.block_manager.prefix_cache_hit_rate)
        finally:
            llm.engine.close()
    assert results[2][:2] == results[1][:2]
    assert results[2][2] > 0 and results[2][3] > 0  # preemptions happened, the prefix cache was hit
